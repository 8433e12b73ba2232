"""Edge cases shared by every structured loss (SPEC §9): one class, singletons, duplicates,
batches of one, half precision, non-contiguous inputs, hyper-parameter checks, the
multi-similarity miner, and the docstring examples."""

from __future__ import annotations

import pytest
import reference_structured as ref
import torch
from reference_structured import assert_same, batch, block_size  # noqa: F401

from deepmetric.distances import CosineSimilarity, DotProductSimilarity, EuclideanDistance
from deepmetric.losses.boundary import MarginLoss, margin_loss, ranked_list_loss
from deepmetric.losses.clustering import (
    coupled_clusters_loss,
    deep_clustering_loss,
    facility_location_loss,
)
from deepmetric.losses.histogram import histogram_loss
from deepmetric.losses.softmax_pairs import npairs_loss, ntxent_loss, supcon_loss
from deepmetric.losses.structured import circle_loss, lifted_structure_loss, multi_similarity_loss
from deepmetric.miners import MultiSimilarityMiner
from deepmetric.tuples import MinedTuple, reference_key

LOSSES = {
    "lifted": lifted_structure_loss,
    "lifted hard": lambda *a, **k: lifted_structure_loss(*a, smooth=False, **k),
    "multi-similarity": multi_similarity_loss,
    "circle": circle_loss,
    "ranked list": ranked_list_loss,
    "margin": margin_loss,
    "ntxent": ntxent_loss,
    "npairs": npairs_loss,
    "supcon": supcon_loss,
    "histogram": histogram_loss,
    "coupled clusters": coupled_clusters_loss,
    "facility location": facility_location_loss,
    "deep clustering": deep_clustering_loss,
}
# Which losses are exactly 0 when the batch has no negative pair / no positive pair.
ZERO_WITHOUT_NEGATIVES = {
    "lifted",
    "lifted hard",
    "circle",
    "ntxent",
    "histogram",
    "coupled clusters",
    "facility location",
}
ZERO_WITHOUT_POSITIVES = {
    "lifted",
    "lifted hard",
    "circle",
    "ntxent",
    "supcon",
    "histogram",
    "coupled clusters",
    "facility location",
}


def edge_batches():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    duplicated = x[[0, 0, 1, 1, 2, 2]]
    return {
        "one class": (x, torch.full((6,), 5)),
        "singletons": (x, torch.tensor([-7, 0, 3, 10**12, 11, 12])),
        "duplicates": (duplicated, torch.tensor([0, 0, 1, 1, 1, 2])),
        "duplicates across classes": (duplicated, torch.tensor([0, 1, 1, 2, 2, 0])),
        "collapsed": (torch.zeros(6, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])),
        "batch of one": (x[:1], torch.tensor([3])),
    }


@pytest.mark.parametrize("case", list(edge_batches()))
@pytest.mark.parametrize("name", list(LOSSES))
def test_edge_batches_give_finite_values_and_gradients(name, case):
    x, y = edge_batches()[case]
    x = x.clone().requires_grad_()
    loss = LOSSES[name](x, y)
    assert loss.requires_grad, "the loss must stay connected to the graph"
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if (case == "one class" and name in ZERO_WITHOUT_NEGATIVES) or (
        case == "singletons" and name in ZERO_WITHOUT_POSITIVES
    ):
        assert float(loss.detach()) == 0.0
        assert float(grad.abs().max()) == 0.0


REFERENCES = {
    "lifted": (
        lambda x, y: lifted_structure_loss(x, y),
        lambda x, pos, neg: ref.lifted(
            ref.as_matrix(EuclideanDistance(), x), pos, neg, 1, 0, True, True
        ),
    ),
    "lifted hard": (
        lambda x, y: lifted_structure_loss(x, y, smooth=False),
        lambda x, pos, neg: ref.lifted(
            ref.as_matrix(EuclideanDistance(), x), pos, neg, 1, 0, False, True
        ),
    ),
    "multi-similarity": (
        lambda x, y: multi_similarity_loss(x, y),
        lambda x, pos, neg: ref.multi_similarity(
            ref.as_matrix(CosineSimilarity(), x), pos, neg, 2, 50, 0.5, len(x)
        ),
    ),
    "circle": (
        lambda x, y: circle_loss(x, y, gamma=16),
        lambda x, pos, neg: ref.circle(
            ref.as_matrix(CosineSimilarity(), x), pos, neg, 0.4, 16, len(x)
        ),
    ),
    "ranked list": (
        lambda x, y: ranked_list_loss(x, y),
        lambda x, pos, neg: ref.ranked_list(
            ref.as_matrix(EuclideanDistance(), x), pos, neg, 0.4, 1.2, 10, 0, 0.5, len(x)
        ),
    ),
    "margin": (
        lambda x, y: margin_loss(x, y, reduction="mean"),
        lambda x, pos, neg: ref.margin(
            ref.as_matrix(EuclideanDistance(), x), pos, neg, 0.2, lambda i: 1.2, 0, "mean"
        ),
    ),
    "ntxent": (
        lambda x, y: ntxent_loss(x, y, temperature=0.5),
        lambda x, pos, neg: ref.ntxent(ref.as_matrix(CosineSimilarity(), x), pos, neg, 0.5),
    ),
    "npairs": (
        lambda x, y: npairs_loss(x, y),
        lambda x, pos, neg: ref.npairs(
            x, ref.as_matrix(DotProductSimilarity(), x), pos, neg, 0.002
        ),
    ),
    "supcon": (
        lambda x, y: supcon_loss(x, y),
        lambda x, pos, neg: ref.supcon(ref.as_matrix(CosineSimilarity(), x), pos, neg, 0.1, len(x)),
    ),
}


@pytest.mark.parametrize("case", ["duplicates", "duplicates across classes", "one class"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_edge_batches_match_references(name, case):
    x, y = edge_batches()[case]
    pos, neg = ref.pair_sets(y)
    fast, slow = REFERENCES[name]
    assert_same(lambda x: fast(x, y), lambda x: slow(x, pos, neg), x, atol=1e-7)


def test_facility_location_with_ties_matches_reference():
    x, y = edge_batches()["duplicates across classes"]
    x = torch.cat([x, x[:3] + 1])
    y = torch.cat([y, torch.tensor([4, 4, 5])])
    for gamma in (0.3, 3.0):
        _, medoids = ref.facility_location(x, y, EuclideanDistance(), gamma)
        _, stats = facility_location_loss(x, y, margin_multiplier=gamma, return_stats=True)
        assert stats.medoids.tolist() == medoids
        assert_same(
            lambda x, g=gamma: facility_location_loss(x, y, margin_multiplier=g),
            lambda x, g=gamma: ref.facility_location(x, y, EuclideanDistance(), g)[0],
            x,
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(LOSSES))
def test_half_precision_inputs(name, dtype):
    x, y, _, _ = batch(1)
    x = x.to(dtype).requires_grad_()
    loss = LOSSES[name](x, y)
    assert loss.dtype == dtype
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()
    torch.testing.assert_close(
        loss.double(), LOSSES[name](x.detach().double(), y), rtol=2e-2, atol=2e-2
    )


@pytest.mark.parametrize("name", list(LOSSES))
def test_non_contiguous_inputs(name):
    x, y, _, _ = batch(2, dim=10)
    view = x[:, ::2]
    assert not view.is_contiguous()
    torch.testing.assert_close(LOSSES[name](view, y), LOSSES[name](view.contiguous(), y))


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda x, y: ntxent_loss(x, y, temperature=0), "temperature"),
        (lambda x, y: ntxent_loss(x, y, temperature=-0.1), "temperature"),
        (lambda x, y: supcon_loss(x, y, temperature=0), "temperature"),
        (lambda x, y: npairs_loss(x, y, l2_reg_weight=-1), "l2_reg_weight"),
        (lambda x, y: multi_similarity_loss(x, y, alpha=0), "alpha"),
        (lambda x, y: multi_similarity_loss(x, y, beta=-2), "beta"),
        (lambda x, y: circle_loss(x, y, gamma=0), "gamma"),
        (lambda x, y: circle_loss(x, y, m=1.5), "m must"),
        (lambda x, y: lifted_structure_loss(x, y, neg_margin=-1), "neg_margin"),
        (lambda x, y: ranked_list_loss(x, y, imbalance=2), "imbalance"),
        (lambda x, y: ranked_list_loss(x, y, Tn=-1), "Tn"),
        (lambda x, y: ranked_list_loss(x, y, margin=-0.1), "margin"),
        (lambda x, y: margin_loss(x, y, margin=-0.1), "margin"),
        (lambda x, y: margin_loss(x, y, nu=-1), "nu"),
        (lambda x, y: margin_loss(x, y, beta=torch.ones(2)), "num_classes"),
        (lambda x, y: histogram_loss(x, y, n_bins=0), "n_bins"),
        (lambda x, y: histogram_loss(x, y, value_range=(1, -1)), "value_range"),
        (lambda x, y: coupled_clusters_loss(x, y, margin=-1), "margin"),
        (lambda x, y: facility_location_loss(x, y, margin_multiplier=-1), "margin_multiplier"),
        (lambda x, y: ntxent_loss(x, y, reduction="max"), "reduction"),
        (lambda x, y: MarginLoss(num_classes=0), "num_classes"),
    ],
)
def test_hyper_parameters_are_checked(call, argument):
    x, y, _, _ = batch(0)
    with pytest.raises(ValueError, match=argument):
        call(x, y)


@pytest.mark.parametrize("name", [n for n in LOSSES if n not in ("facility location",)])
def test_input_errors_name_the_argument(name):
    x, y, _, _ = batch(0)
    with pytest.raises(ValueError, match="labels has 10 entries"):
        LOSSES[name](x, y[:10])
    with pytest.raises(TypeError, match="labels"):
        LOSSES[name](x, y.float())
    bad = x.clone()
    bad[0, 0] = torch.nan
    with pytest.raises(ValueError, match="NaN"):
        LOSSES[name](bad, y)


def test_reference_labels_absent_from_the_batch():
    x, y, r, _ = batch(0, num_ref=6)
    ry = torch.tensor([100, 101, 102, 103, 104, 105])
    for name in ("lifted", "ntxent", "supcon", "multi-similarity", "histogram", "margin"):
        value = LOSSES[name](x.clone().requires_grad_(), y, ref_emb=r, ref_labels=ry)
        assert torch.isfinite(value)


# ---------------------------------------------------------------------------------------------
# Multi-similarity miner


def reference_ms_mining(sim, labels, ref_labels, epsilon, same_set):
    pos, neg = ref.pair_sets(labels, None if same_set else ref_labels)
    kept_pos, kept_neg = set(), set()
    for i in range(len(labels)):
        p = [sim[i, j] for (a, j) in pos if a == i]
        n = [sim[i, j] for (a, j) in neg if a == i]
        for a, j in neg:
            if a == i and p and sim[i, j] + epsilon > min(p):
                kept_neg.add((i, j))
        for a, j in pos:
            if a == i and n and sim[i, j] - epsilon < max(n):
                kept_pos.add((i, j))
    return kept_pos, kept_neg


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("distance", [CosineSimilarity(), EuclideanDistance()])
def test_multi_similarity_miner_matches_the_rule(seed, distance):
    x, y, r, ry = batch(seed, n=14, num_ref=9)
    miner = MultiSimilarityMiner(epsilon=0.1, distance=distance)
    for ref_emb, ref_labels in ((None, None), (r, ry)):
        mined = miner(x, y, ref_emb, ref_labels)
        assert isinstance(mined, MinedTuple) and len(mined) == 4
        assert mined.reference_key == reference_key(ref_emb)
        mat = distance(x, x if ref_emb is None else ref_emb)
        sim = mat if distance.is_inverted else -mat
        expected = reference_ms_mining(sim, y, ry, 0.1, ref_emb is None)
        a1, p, a2, n = (t.tolist() for t in mined)
        assert set(zip(a1, p, strict=True)) == expected[0]
        assert set(zip(a2, n, strict=True)) == expected[1]
        loss = multi_similarity_loss(x, y, mined, ref_emb, ref_labels)
        assert torch.isfinite(loss)


def test_miner_and_loss_must_share_the_reference_set():
    x, y, r, ry = batch(0, num_ref=6)
    mined = MultiSimilarityMiner()(x, y, r, ry)
    with pytest.raises(ValueError, match="different reference set"):
        multi_similarity_loss(x, y, mined)
    with pytest.raises(ValueError, match="epsilon"):
        MultiSimilarityMiner(epsilon=-1)


@pytest.mark.parametrize(
    "name",
    [n for n in LOSSES if n not in ("coupled clusters", "facility location", "deep clustering")],
)
def test_mined_pairs_need_no_labels(name):
    x, y, _, _ = batch(3)
    mined = MultiSimilarityMiner(epsilon=0.5)(x, y)
    torch.testing.assert_close(LOSSES[name](x, None, mined), LOSSES[name](x, y, mined))


# Losses whose first derivative is the gradient of the loss itself (circle and ranked list
# treat their pair weights as constants in backpropagation, as their papers do, so their
# "gradient" is not the derivative of any one function and has no numerical second derivative
# to check against).
TWICE_DIFFERENTIABLE = [
    "lifted",
    "lifted hard",
    "multi-similarity",
    "margin",
    "ntxent",
    "npairs",
    "supcon",
    "histogram",
]


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("name", TWICE_DIFFERENTIABLE)
@pytest.mark.parametrize("with_ref", [False, True], ids=["batch", "ref_emb"])
def test_swept_losses_have_second_derivatives(name, with_ref):
    """One double-backward policy (deepmetric.blocks): under create_graph the sweep replays
    the loss by plain differentiable steps, so a gradient penalty is exact (gradgradcheck)."""
    x, y, r, ry = batch(3, n=7, dim=3, num_ref=6 if with_ref else 0)
    inputs = (x.requires_grad_(),) if r is None else (x.requires_grad_(), r.requires_grad_())
    extra = {"distance": CosineSimilarity()} if name in ("histogram",) else {}

    def loss(a, b=None):
        return LOSSES[name](a, y, ref_emb=b, ref_labels=ry, **extra)

    assert torch.autograd.gradgradcheck(loss, inputs)


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("name", ["circle", "ranked list"])
def test_constant_weight_losses_keep_their_gradient_under_create_graph(name):
    x, y, _, _ = batch(4, n=7, dim=3)
    x.requires_grad_()
    (plain,) = torch.autograd.grad(LOSSES[name](x, y), x)
    (with_graph,) = torch.autograd.grad(LOSSES[name](x, y), x, create_graph=True)
    assert with_graph.requires_grad
    torch.testing.assert_close(with_graph, plain)
