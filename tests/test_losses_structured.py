"""Lifted structure, multi-similarity, circle, ranked list, margin and histogram losses against
slow references written from the papers (float64, values and gradients), plus analytic values."""

from __future__ import annotations

import math

import pytest
import reference_structured as ref
import torch
from reference_structured import SEEDS, assert_same, batch, block_size, mined_pairs  # noqa: F401

from deepmetric.distances import (
    CosineSimilarity,
    DotProductSimilarity,
    EuclideanDistance,
    MahalanobisDistance,
    SquaredEuclideanDistance,
)
from deepmetric.losses import structured
from deepmetric.losses.boundary import MarginLoss, RankedListLoss, margin_loss, ranked_list_loss
from deepmetric.losses.histogram import HistogramLoss, histogram_loss
from deepmetric.losses.structured import (
    CircleLoss,
    LiftedStructureLoss,
    MultiSimilarityLoss,
    circle_loss,
    lifted_structure_loss,
    multi_similarity_loss,
)

# ---------------------------------------------------------------------------------------------
# Lifted structured loss


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("distance", [EuclideanDistance(), CosineSimilarity()])
def test_lifted_matches_reference(seed, smooth, distance):
    x, y, _, _ = batch(seed)
    pos, neg = ref.pair_sets(y)

    def slow(x):
        dis = distance.as_dissimilarity(ref.as_matrix(distance, x))
        return ref.lifted(dis, pos, neg, 1.2, 0.1, smooth, same_set=True)

    fast = lambda x: lifted_structure_loss(  # noqa: E731
        x, y, neg_margin=1.2, pos_margin=0.1, smooth=smooth, distance=distance
    )
    assert_same(fast, slow, x)


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("smooth", [True, False])
def test_lifted_with_reference_set(seed, smooth):
    x, y, r, ry = batch(seed, num_ref=9)
    pos, neg = ref.pair_sets(y, ry)
    distance = EuclideanDistance()

    def slow(x, r):
        dis = ref.as_matrix(distance, x, r)
        return ref.lifted(dis, pos, neg, 3.0, 0.0, smooth, same_set=False)

    fast = lambda x, r: lifted_structure_loss(  # noqa: E731
        x, y, ref_emb=r, ref_labels=ry, neg_margin=3.0, smooth=smooth
    )
    assert_same(fast, slow, x, r)


def test_lifted_collapsed_batch_analytic():
    # Every distance 0: hard form J = alpha, smooth form J = alpha + log(n_i + n_j).
    x = torch.ones(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    hard = lifted_structure_loss(x, y, neg_margin=1.5, smooth=False)
    assert float(hard) == pytest.approx(1.5**2 / 2)
    negatives = {0: 3, 1: 4, 2: 5}  # per class: number of items of other classes
    pairs = [(a, b) for a in range(6) for b in range(6) if a != b and y[a] == y[b]]
    expected = sum((1.5 + math.log(2 * negatives[int(y[a])])) ** 2 for a, b in pairs)
    smooth = lifted_structure_loss(x, y, neg_margin=1.5)
    assert float(smooth) == pytest.approx(expected / (2 * len(pairs)))


def test_lifted_separated_batch_is_zero():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    assert float(lifted_structure_loss(x, y, neg_margin=1.0, smooth=False)) == 0.0
    assert float(lifted_structure_loss(x, y, neg_margin=1.0)) < 1e-6


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("layout", ["one class", "two classes"])
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("with_ref", [False, True])
def test_lifted_one_and_two_class_layouts(layout, smooth, with_ref, monkeypatch):
    """Large classes (every row's positives span the batch): the statistics are gathered per
    block of rows, never as an (N, K) table, and the positive lists read one row at a time
    here; values and gradients match the loop reference."""
    monkeypatch.setattr(structured, "LIST_CHUNK_ELEMENTS", 1)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = torch.zeros(12, dtype=torch.long) if layout == "one class" else torch.arange(12) % 2
    r = torch.randn(7, 3, generator=gen, dtype=torch.float64) if with_ref else None
    ry = torch.tensor([0, 1, 0, 0, 1, 0, 0]) if with_ref else None
    pos, neg = ref.pair_sets(y, ry)

    def slow(x, *r):
        dis = ref.as_matrix(EuclideanDistance(), x, *r)
        return ref.lifted(dis, pos, neg, 2.0, 0.1, smooth, same_set=not with_ref)

    def fast(x, *r):
        refs = {"ref_emb": r[0], "ref_labels": ry} if r else {}
        return lifted_structure_loss(x, y, neg_margin=2.0, pos_margin=0.1, smooth=smooth, **refs)

    assert_same(fast, slow, *((x, r) if with_ref else (x,)))


# ---------------------------------------------------------------------------------------------
# Multi-similarity loss


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("distance", [CosineSimilarity(), EuclideanDistance()])
def test_multi_similarity_matches_reference(seed, distance):
    x, y, _, _ = batch(seed)
    pos, neg = ref.pair_sets(y)

    def slow(x):
        sim = ref.as_matrix(distance, x)
        sim = sim if distance.is_inverted else -sim
        return ref.multi_similarity(sim, pos, neg, 2.0, 10.0, 0.5, len(x))

    fast = lambda x: multi_similarity_loss(x, y, alpha=2.0, beta=10.0, distance=distance)  # noqa: E731
    assert_same(fast, slow, x)


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
def test_multi_similarity_reference_set_and_mined_pairs(seed):
    x, y, r, ry = batch(seed, num_ref=9)
    distance = CosineSimilarity()
    pos, neg = ref.pair_sets(y, ry)
    assert_same(
        lambda x, r: multi_similarity_loss(x, y, ref_emb=r, ref_labels=ry),
        lambda x, r: ref.multi_similarity(ref.as_matrix(distance, x, r), pos, neg, 2, 50, 0.5, 11),
        x,
        r,
    )
    mined = mined_pairs(seed, len(x), len(x))
    pos, neg = ref.pair_sets(y, indices_tuple=mined)
    assert_same(
        lambda x: multi_similarity_loss(x, y, mined),
        lambda x: ref.multi_similarity(ref.as_matrix(distance, x), pos, neg, 2, 50, 0.5, 11),
        x,
    )


def test_multi_similarity_separated_batch_analytic():
    # Orthonormal classes: s = 1 for positives, 0 for negatives.
    x = torch.eye(3, dtype=torch.float64).repeat_interleave(2, dim=0)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    alpha, beta, base = 2.0, 50.0, 0.5
    expected = (
        math.log1p(math.exp(-alpha * (1 - base))) / alpha
        + math.log1p(4 * math.exp(-beta * base)) / beta
    )
    assert float(multi_similarity_loss(x, y, alpha=alpha, beta=beta, base=base)) == pytest.approx(
        expected
    )


# ---------------------------------------------------------------------------------------------
# Circle loss


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("m, gamma", [(0.25, 16.0), (0.4, 80.0)])
def test_circle_matches_reference(seed, m, gamma):
    x, y, _, _ = batch(seed)
    pos, neg = ref.pair_sets(y)
    distance = CosineSimilarity()
    assert_same(
        lambda x: circle_loss(x, y, m=m, gamma=gamma),
        lambda x: ref.circle(ref.as_matrix(distance, x), pos, neg, m, gamma, len(x)),
        x,
        atol=1e-7,
    )


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
def test_circle_reference_set(seed):
    x, y, r, ry = batch(seed, num_ref=9)
    pos, neg = ref.pair_sets(y, ry)
    distance = CosineSimilarity()
    assert_same(
        lambda x, r: circle_loss(x, y, ref_emb=r, ref_labels=ry, gamma=32),
        lambda x, r: ref.circle(ref.as_matrix(distance, x, r), pos, neg, 0.4, 32, len(x)),
        x,
        r,
    )


def test_circle_collapsed_batch_analytic():
    # s = 1 everywhere: a_p = m, a_n = 1 + m, L = softplus(log(|P||N|) + gamma (1 - 2 m^2)).
    x = torch.ones(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1])
    m, gamma = 0.25, 4.0
    counts = [(1, 3), (1, 3), (2, 2), (2, 2), (2, 2)]
    expected = sum(
        math.log1p(math.exp(math.log(p * n) + gamma * (1 - 2 * m * m))) for p, n in counts
    ) / len(counts)
    assert float(circle_loss(x, y, m=m, gamma=gamma)) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Ranked list loss


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("Tp", [0.0, 3.0])
def test_ranked_list_matches_reference(seed, Tp):  # noqa: N803
    x, y, _, _ = batch(seed)
    x = torch.nn.functional.normalize(x)
    pos, neg = ref.pair_sets(y)
    distance = EuclideanDistance()
    assert_same(
        lambda x: ranked_list_loss(x, y, margin=0.4, Tn=10, Tp=Tp, imbalance=0.3),
        lambda x: ref.ranked_list(ref.as_matrix(distance, x), pos, neg, 0.4, 1.2, 10, Tp, 0.3, 11),
        x,
    )


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
def test_ranked_list_reference_set_and_mined(seed):
    x, y, r, ry = batch(seed, num_ref=9)
    distance = EuclideanDistance()
    pos, neg = ref.pair_sets(y, ry)
    assert_same(
        lambda x, r: ranked_list_loss(x, y, ref_emb=r, ref_labels=ry, alpha=3.0),
        lambda x, r: ref.ranked_list(
            ref.as_matrix(distance, x, r), pos, neg, 0.4, 3, 10, 0, 0.5, 11
        ),
        x,
        r,
    )
    mined = mined_pairs(seed, 11, 11)
    pos, neg = ref.pair_sets(y, indices_tuple=mined)
    assert_same(
        lambda x: ranked_list_loss(x, y, mined, alpha=3.0),
        lambda x: ref.ranked_list(ref.as_matrix(distance, x), pos, neg, 0.4, 3, 10, 0, 0.5, 11),
        x,
    )


def test_ranked_list_collapsed_batch_analytic():
    # Distances 0: no positive violates, every negative does by alpha: L = imbalance * alpha.
    x = torch.zeros(4, 2, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    assert float(ranked_list_loss(x, y, margin=0.4, imbalance=0.5)) == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------------
# Margin loss


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("reduction", ["nonzero_mean", "mean", "sum"])
def test_margin_loss_matches_reference(seed, reduction):
    x, y, _, _ = batch(seed)
    x = torch.nn.functional.normalize(x)
    pos, neg = ref.pair_sets(y)
    distance = EuclideanDistance()
    assert_same(
        lambda x: margin_loss(x, y, margin=0.2, beta=1.0, reduction=reduction),
        lambda x: ref.margin(
            ref.as_matrix(distance, x), pos, neg, 0.2, lambda i: 1.0, 0, reduction
        ),
        x,
    )


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
def test_margin_loss_per_class_beta_gradient(seed):
    x, y, r, ry = batch(seed, num_ref=9)
    y = y % 4
    x = torch.nn.functional.normalize(x)
    beta = torch.tensor([0.8, 1.0, 1.2, 1.4], dtype=torch.float64)
    pos, neg = ref.pair_sets(y, ry)
    distance = EuclideanDistance()

    def slow(x, r, beta):
        dis = ref.as_matrix(distance, x, r)
        loss = ref.margin(dis, pos, neg, 0.2, lambda i: beta[int(y[i])], 0, "nonzero_mean")
        return loss + 0.1 * beta[y].mean()

    fast = lambda x, r, beta: margin_loss(  # noqa: E731
        x, y, ref_emb=r, ref_labels=ry, beta=beta, nu=0.1
    )
    assert_same(fast, slow, x, r, beta)


def test_margin_loss_module_learns_beta():
    loss_fn = MarginLoss(beta=1.2, learn_beta=True, num_classes=3, nu=0.01)
    assert isinstance(loss_fn.beta, torch.nn.Parameter)
    assert [p is loss_fn.beta for p in loss_fn.parameters()] == [True]
    x = torch.randn(9, 4)
    loss_fn(x, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])).backward()
    assert loss_fn.beta.grad is not None and loss_fn.beta.grad.shape == (3,)
    with pytest.raises(ValueError, match="num_classes"):
        loss_fn(x, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3]))
    assert list(MarginLoss().parameters()) == []


def test_margin_loss_collapsed_batch_analytic():
    x = torch.zeros(4, 2, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    # D = 0: positives inactive (beta > margin), negatives all active with beta + margin.
    assert float(margin_loss(x, y, margin=0.2, beta=1.2)) == pytest.approx(1.4)


# ---------------------------------------------------------------------------------------------
# Histogram loss


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_bins", [7, 40])
def test_histogram_matches_reference(seed, n_bins):
    x, y, _, _ = batch(seed)
    pos, neg = ref.pair_sets(y)
    distance = CosineSimilarity()
    assert_same(
        lambda x: histogram_loss(x, y, n_bins=n_bins),
        lambda x: ref.histogram(ref.as_matrix(distance, x), pos, neg, n_bins, -1.0, 1.0),
        x,
    )


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
def test_histogram_distance_reference_set_and_mined(seed):
    x, y, r, ry = batch(seed, num_ref=9)
    distance = EuclideanDistance()
    pos, neg = ref.pair_sets(y, ry)
    assert_same(
        lambda x, r: histogram_loss(
            x, y, ref_emb=r, ref_labels=ry, n_bins=10, value_range=(0, 6), distance=distance
        ),
        lambda x, r: ref.histogram(-ref.as_matrix(distance, x, r), pos, neg, 10, -6.0, 0.0),
        x,
        r,
    )
    mined = mined_pairs(seed, 11, 11)
    pos, neg = ref.pair_sets(y, indices_tuple=mined)
    cosine = CosineSimilarity()
    assert_same(
        lambda x: histogram_loss(x, y, mined, n_bins=10),
        lambda x: ref.histogram(ref.as_matrix(cosine, x), pos, neg, 10, -1.0, 1.0),
        x,
    )


def test_histogram_analytic_values():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    collapsed = torch.ones(6, 3, dtype=torch.float64)
    assert float(histogram_loss(collapsed, y, n_bins=10)) == pytest.approx(1.0)
    separated = torch.eye(3, dtype=torch.float64).repeat_interleave(2, dim=0)
    assert float(histogram_loss(separated, y, n_bins=10)) == 0.0
    # Reversed order: every negative at s = 1, every positive at s = 0.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert float(histogram_loss(x, torch.tensor([0, 0, 1, 1]), n_bins=4)) == 1.0


# ---------------------------------------------------------------------------------------------
# Modules, other distances


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize(
    "module, function, kwargs",
    [
        (LiftedStructureLoss, lifted_structure_loss, {"neg_margin": 0.7, "smooth": False}),
        (MultiSimilarityLoss, multi_similarity_loss, {"alpha": 3.0, "beta": 20.0}),
        (CircleLoss, circle_loss, {"m": 0.3, "gamma": 30.0}),
        (RankedListLoss, ranked_list_loss, {"margin": 0.3, "Tn": 5.0}),
        (HistogramLoss, histogram_loss, {"n_bins": 20}),
    ],
)
def test_modules_match_functions_and_record_stats(module, function, kwargs):
    x, y, _, _ = batch(3)
    loss_fn = module(**kwargs)
    torch.testing.assert_close(loss_fn(x, y), function(x, y, **kwargs))
    assert loss_fn.stats is not None


@pytest.mark.parametrize(
    "distance",
    [SquaredEuclideanDistance(), DotProductSimilarity(), MahalanobisDistance(5, rank=3)],
)
def test_any_distance_including_learnable(distance):
    x, y, _, _ = batch(4)
    distance = distance.double()
    pos, neg = ref.pair_sets(y)

    def slow(x):
        return ref.lifted(distance.as_dissimilarity(distance(x, x)), pos, neg, 1.0, 0, True, True)

    assert_same(lambda x: lifted_structure_loss(x, y, distance=distance), slow, x, atol=1e-8)
    params = list(distance.parameters())
    if params:
        fast = torch.autograd.grad(lifted_structure_loss(x, y, distance=distance), params)
        slow_grad = torch.autograd.grad(slow(x), params)
        torch.testing.assert_close(fast, slow_grad)
