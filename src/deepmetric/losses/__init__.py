"""Embedding losses. Every loss is called the same way:

    loss = loss_fn(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)

Families: pair and triplet (`pair_triplet`).
"""

from __future__ import annotations

from deepmetric.losses.base import MetricLoss
from deepmetric.losses.pair_triplet import (
    ContrastiveLoss,
    PairStats,
    TripletMarginLoss,
    TripletStats,
    contrastive_loss,
    triplet_margin_loss,
)
from deepmetric.losses.reduction import REDUCTIONS

__all__ = [
    "REDUCTIONS",
    "ContrastiveLoss",
    "MetricLoss",
    "PairStats",
    "TripletMarginLoss",
    "TripletStats",
    "contrastive_loss",
    "triplet_margin_loss",
]
