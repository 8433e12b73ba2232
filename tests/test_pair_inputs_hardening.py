"""Issue-10 cases of the distances, pair/triplet/structured losses and miners: half-precision
distances, all-zero rows under cosine distances, half-precision overflow, label dtypes."""

from __future__ import annotations

import inspect

import pytest
import torch

from deepmetric import distances, losses, miners
from deepmetric.distances import BaseDistance, CosineSimilarity, LpDistance

D = 6


def _distance_instances():
    found = []
    for name, cls in inspect.getmembers(distances, inspect.isclass):
        if not issubclass(cls, BaseDistance) or cls is BaseDistance:
            continue
        found.append((name, cls(D) if name == "MahalanobisDistance" else cls()))
    found += [("Lp(p=3)", LpDistance(p=3)), ("Lp(p=0.5)", LpDistance(p=0.5, power=2))]
    return found


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name, distance", _distance_instances(), ids=lambda v: str(v)[:24])
def test_every_distance_works_on_half_precision(name, distance, dtype):
    generator = torch.Generator().manual_seed(0)
    query, ref = torch.randn(5, D, generator=generator), torch.randn(4, D, generator=generator)
    exact = distance(query, ref)
    half = distance(query.to(dtype), ref.to(dtype))
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), exact, atol=0.05, rtol=0.02)
    pairwise = distance.pairwise_distance(query[:4].to(dtype), ref.to(dtype))
    assert pairwise.dtype == dtype
    torch.testing.assert_close(
        pairwise.float(), distance.pairwise_distance(query[:4], ref), atol=0.05, rtol=0.02
    )


LABELS = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])

COSINE_LOSSES = {
    "contrastive": lambda: losses.ContrastiveLoss(
        pos_margin=0.9, neg_margin=0.2, distance=CosineSimilarity()
    ),
    "triplet": lambda: losses.TripletMarginLoss(distance=CosineSimilarity()),
    "triplet_smooth": lambda: losses.TripletMarginLoss(
        smooth_loss=True, distance=CosineSimilarity()
    ),
    "lifted": lambda: losses.LiftedStructureLoss(distance=CosineSimilarity()),
    "multi_similarity": losses.MultiSimilarityLoss,
    "circle": losses.CircleLoss,
    "ranked_list": lambda: losses.RankedListLoss(distance=CosineSimilarity()),
    "margin": lambda: losses.MarginLoss(distance=CosineSimilarity()),
    "ntxent": losses.NTXentLoss,
    "supcon": losses.SupConLoss,
    "npairs": lambda: losses.NPairsLoss(distance=CosineSimilarity()),
    "histogram": losses.HistogramLoss,
    "coupled_clusters": lambda: losses.CoupledClustersLoss(distance=CosineSimilarity()),
    "deep_clustering": lambda: losses.DeepClusteringLoss(distance=CosineSimilarity()),
}


@pytest.mark.parametrize("name", sorted(COSINE_LOSSES))
def test_all_zero_rows_under_cosine_get_a_zero_gradient(name):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(len(LABELS), D, generator=generator, dtype=torch.float64)
    x[0] = 0
    x[5] = 0
    x.requires_grad_()
    loss = COSINE_LOSSES[name]()(x, LABELS)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert float(grad.abs().max()) < 1e3  # F.normalize's own slope at 0 would give ~1e12
    if name != "coupled_clusters":  # its class centres are means of the raw rows
        assert float(grad[0].abs().max()) == 0.0
        assert float(grad[5].abs().max()) == 0.0


def test_zero_rows_keep_the_values_of_f_normalize():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0]])
    torch.testing.assert_close(
        distances.safe_normalize(x), torch.nn.functional.normalize(x, dim=1), atol=0.11, rtol=0
    )
    assert float(distances.safe_normalize(x)[1].abs().sum()) == 0.0


def test_half_precision_overflow_raises_instead_of_inf():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(32, 8, generator=generator)
    y = torch.randint(0, 4, (32,), generator=generator)
    with pytest.raises(ValueError, match="does not fit in torch.float16"):
        losses.DeepClusteringLoss()((x * 100).half(), y)
    small = losses.DeepClusteringLoss()(x.half(), y)
    assert small.dtype == torch.float16 and torch.isfinite(small)


LOSS_CLASSES = {
    "contrastive": losses.ContrastiveLoss,
    "triplet": losses.TripletMarginLoss,
    "lifted": losses.LiftedStructureLoss,
    "multi_similarity": losses.MultiSimilarityLoss,
    "circle": losses.CircleLoss,
    "ranked_list": losses.RankedListLoss,
    "margin": losses.MarginLoss,
    "ntxent": losses.NTXentLoss,
    "supcon": losses.SupConLoss,
    "npairs": losses.NPairsLoss,
    "histogram": losses.HistogramLoss,
    "coupled_clusters": losses.CoupledClustersLoss,
    "facility_location": losses.FacilityLocationLoss,
    "deep_clustering": losses.DeepClusteringLoss,
}
LABEL_DTYPES = [torch.int8, torch.int16, torch.int32, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(LOSS_CLASSES))
def test_losses_take_labels_of_any_integer_dtype_and_bool(name, dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(len(LABELS), D, generator=generator)
    labels = (LABELS % 2) if dtype == torch.bool else LABELS
    expected = LOSS_CLASSES[name]()(x, labels)
    torch.testing.assert_close(LOSS_CLASSES[name]()(x, labels.to(dtype)), expected)


MINER_CLASSES = [
    miners.AllPairsMiner,
    miners.AllTripletsMiner,
    miners.BatchHardMiner,
    miners.HardNetMiner,
    miners.MultiSimilarityMiner,
    miners.PairMarginMiner,
    miners.TripletMarginMiner,
]


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("cls", MINER_CLASSES, ids=lambda c: c.__name__)
def test_miners_take_labels_of_any_integer_dtype_and_bool(cls, dtype):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(len(LABELS), D, generator=generator)
    labels = (LABELS % 2) if dtype == torch.bool else LABELS
    expected = cls()(x, labels)
    got = cls()(x, labels.to(dtype))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


HYPER_PARAMETERS = [
    (losses.ContrastiveLoss, ["pos_margin", "neg_margin", "power"]),
    (losses.TripletMarginLoss, ["margin"]),
    (losses.LiftedStructureLoss, ["neg_margin", "pos_margin"]),
    (losses.MultiSimilarityLoss, ["alpha", "beta", "base"]),
    (losses.CircleLoss, ["m", "gamma"]),
    (losses.RankedListLoss, ["margin", "Tn", "imbalance", "alpha", "Tp"]),
    (losses.MarginLoss, ["margin", "nu"]),
    (losses.NTXentLoss, ["temperature"]),
    (losses.NPairsLoss, ["l2_reg_weight"]),
    (losses.SupConLoss, ["temperature"]),
    (losses.HistogramLoss, ["n_bins"]),
    (losses.CoupledClustersLoss, ["margin"]),
    (losses.FacilityLocationLoss, ["margin_multiplier"]),
    (miners.PairMarginMiner, ["pos_margin", "neg_margin"]),
    (miners.TripletMarginMiner, ["margin"]),
    (miners.MultiSimilarityMiner, ["epsilon"]),
    (miners.DistanceWeightedMiner, ["cutoff", "nonzero_loss_cutoff"]),
    (miners.RankWindowMiner, ["negatives_per_positive"]),
    (distances.LpDistance, ["p", "power"]),
]


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
@pytest.mark.parametrize(
    "cls, name",
    [(cls, name) for cls, names in HYPER_PARAMETERS for name in names],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_hyper_parameters_refuse_nan_and_inf_when_set_later(cls, name, bad):
    module = cls()
    with pytest.raises(ValueError, match=name):
        setattr(module, name, bad)
    with pytest.raises(ValueError, match=name):
        cls(**{name: bad})


def test_double_backward_through_a_swept_loss_is_exact():
    x = torch.randn(len(LABELS), D, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(losses.supcon_loss(x, LABELS), x, create_graph=True)
    (plain,) = torch.autograd.grad(losses.supcon_loss(x, LABELS), x)
    torch.testing.assert_close(grad, plain)
    assert torch.autograd.gradgradcheck(lambda a: losses.supcon_loss(a, LABELS), (x,))
