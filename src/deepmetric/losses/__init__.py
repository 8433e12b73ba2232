"""Embedding losses. Every loss is called the same way:

    loss = loss_fn(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)

Families: pair and triplet (`pair_triplet`); structured batch losses (`structured`,
`boundary`, `softmax_pairs`, `histogram`, `clustering`); proxies, centres and margin softmax
(`softmax`, `proxy`, `additive_margin`, `distillation`, with `param_groups` to give loss
parameters their own learning rate).
"""

from __future__ import annotations

from deepmetric.losses.additive_margin import (
    AdaptiveMargin,
    AdditiveMarginLoss,
    AdditiveMarginStats,
    MarginEstimate,
    additive_margin_loss,
)
from deepmetric.losses.base import MetricLoss
from deepmetric.losses.boundary import MarginLoss, RankedListLoss, margin_loss, ranked_list_loss
from deepmetric.losses.classifier import ClassifierStats
from deepmetric.losses.clustering import (
    CoupledClustersLoss,
    DeepClusteringLoss,
    DeepClusteringStats,
    FacilityLocationLoss,
    FacilityLocationStats,
    coupled_clusters_loss,
    deep_clustering_loss,
    facility_location_loss,
)
from deepmetric.losses.distillation import (
    DistillationLoss,
    distillation_loss,
    similarity_distillation_loss,
)
from deepmetric.losses.histogram import HistogramLoss, HistogramStats, histogram_loss
from deepmetric.losses.pair_triplet import (
    ContrastiveLoss,
    PairStats,
    TripletMarginLoss,
    TripletStats,
    contrastive_loss,
    triplet_margin_loss,
)
from deepmetric.losses.param_groups import param_groups
from deepmetric.losses.proxy import (
    CenterLoss,
    ProxyAnchorLoss,
    ProxyAnchorStats,
    ProxyNCALoss,
    center_loss,
    proxy_anchor_loss,
    proxy_nca_loss,
    update_centers,
)
from deepmetric.losses.reduction import REDUCTIONS
from deepmetric.losses.softmax import (
    ArcFaceLoss,
    CosFaceLoss,
    HeatedUpSoftmaxLoss,
    LambdaSchedule,
    LargeMarginSoftmaxLoss,
    NormalizedSoftmaxLoss,
    SphereFaceLoss,
    arcface_loss,
    cosface_loss,
    large_margin_softmax_loss,
    normalized_softmax_loss,
)
from deepmetric.losses.softmax_pairs import (
    NPairsLoss,
    NTXentLoss,
    SupConLoss,
    npairs_loss,
    ntxent_loss,
    supcon_loss,
)
from deepmetric.losses.structured import (
    CircleLoss,
    LiftedStructureLoss,
    MultiSimilarityLoss,
    StructuredStats,
    circle_loss,
    lifted_structure_loss,
    multi_similarity_loss,
)

__all__ = [
    "REDUCTIONS",
    "ContrastiveLoss",
    "MetricLoss",
    "PairStats",
    "TripletMarginLoss",
    "TripletStats",
    "contrastive_loss",
    "triplet_margin_loss",
    "AdaptiveMargin",
    "AdditiveMarginLoss",
    "AdditiveMarginStats",
    "ArcFaceLoss",
    "CenterLoss",
    "ClassifierStats",
    "CosFaceLoss",
    "DistillationLoss",
    "HeatedUpSoftmaxLoss",
    "LambdaSchedule",
    "LargeMarginSoftmaxLoss",
    "MarginEstimate",
    "NormalizedSoftmaxLoss",
    "ProxyAnchorLoss",
    "ProxyAnchorStats",
    "ProxyNCALoss",
    "SphereFaceLoss",
    "additive_margin_loss",
    "arcface_loss",
    "center_loss",
    "cosface_loss",
    "distillation_loss",
    "large_margin_softmax_loss",
    "normalized_softmax_loss",
    "param_groups",
    "proxy_anchor_loss",
    "proxy_nca_loss",
    "similarity_distillation_loss",
    "update_centers",
    "CircleLoss",
    "CoupledClustersLoss",
    "DeepClusteringLoss",
    "DeepClusteringStats",
    "FacilityLocationLoss",
    "FacilityLocationStats",
    "HistogramLoss",
    "HistogramStats",
    "LiftedStructureLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "NPairsLoss",
    "NTXentLoss",
    "RankedListLoss",
    "StructuredStats",
    "SupConLoss",
    "circle_loss",
    "coupled_clusters_loss",
    "deep_clustering_loss",
    "facility_location_loss",
    "histogram_loss",
    "lifted_structure_loss",
    "margin_loss",
    "multi_similarity_loss",
    "npairs_loss",
    "ntxent_loss",
    "ranked_list_loss",
    "supcon_loss",
]
