"""N-pair, NT-Xent / InfoNCE and SupCon losses against slow references (float64, values and
gradients), analytic values, and numerical stability at small temperatures."""

from __future__ import annotations

import math

import pytest
import reference_structured as ref
import torch
from reference_structured import SEEDS, assert_same, batch, block_size, mined_pairs  # noqa: F401

from deepmetric.distances import CosineSimilarity, DotProductSimilarity, EuclideanDistance
from deepmetric.losses.softmax_pairs import (
    NPairsLoss,
    NTXentLoss,
    SupConLoss,
    npairs_loss,
    ntxent_loss,
    supcon_loss,
)


def similarity(distance, x, r=None):
    mat = ref.as_matrix(distance, x, r)
    return mat if distance.is_inverted else -mat


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("distance", [CosineSimilarity(), EuclideanDistance()])
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_ntxent_matches_reference(seed, distance, temperature):
    x, y, _, _ = batch(seed)
    pos, neg = ref.pair_sets(y)
    assert_same(
        lambda x: ntxent_loss(x, y, temperature=temperature, distance=distance),
        lambda x: ref.ntxent(similarity(distance, x), pos, neg, temperature),
        x,
    )


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
def test_ntxent_reference_set_and_mined(seed):
    x, y, r, ry = batch(seed, num_ref=9)
    cosine = CosineSimilarity()
    pos, neg = ref.pair_sets(y, ry)
    assert_same(
        lambda x, r: ntxent_loss(x, y, ref_emb=r, ref_labels=ry, temperature=0.2),
        lambda x, r: ref.ntxent(similarity(cosine, x, r), pos, neg, 0.2),
        x,
        r,
    )
    mined = mined_pairs(seed, 11, 11)
    pos, neg = ref.pair_sets(y, indices_tuple=mined)
    assert_same(
        lambda x: ntxent_loss(x, y, mined, temperature=0.2),
        lambda x: ref.ntxent(similarity(cosine, x), pos, neg, 0.2),
        x,
    )


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("l2_reg_weight", [0.0, 0.05])
def test_npairs_matches_survey_eq4(seed, l2_reg_weight):
    x, y, _, _ = batch(seed)
    pos, neg = ref.pair_sets(y)
    dot = DotProductSimilarity()
    assert_same(
        lambda x: npairs_loss(x, y, l2_reg_weight=l2_reg_weight),
        lambda x: ref.npairs(x, similarity(dot, x), pos, neg, l2_reg_weight),
        x,
    )


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supcon_matches_reference(seed, temperature):
    x, y, _, _ = batch(seed)
    pos, neg = ref.pair_sets(y)
    cosine = CosineSimilarity()
    assert_same(
        lambda x: supcon_loss(x, y, temperature=temperature),
        lambda x: ref.supcon(similarity(cosine, x), pos, neg, temperature, len(x)),
        x,
    )


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("seed", SEEDS)
def test_supcon_reference_set_and_mined(seed):
    x, y, r, ry = batch(seed, num_ref=9)
    cosine = CosineSimilarity()
    pos, neg = ref.pair_sets(y, ry)
    assert_same(
        lambda x, r: supcon_loss(x, y, ref_emb=r, ref_labels=ry),
        lambda x, r: ref.supcon(similarity(cosine, x, r), pos, neg, 0.1, len(x)),
        x,
        r,
    )
    mined = mined_pairs(seed, 11, 11)
    pos, neg = ref.pair_sets(y, indices_tuple=mined)
    assert_same(
        lambda x: supcon_loss(x, y, mined),
        lambda x: ref.supcon(similarity(cosine, x), pos, neg, 0.1, len(x)),
        x,
    )


def test_analytic_values():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    collapsed = torch.ones(6, 3, dtype=torch.float64)
    negatives = {0: 3, 1: 4, 2: 5}
    pairs = [(a, b) for a in range(6) for b in range(6) if a != b and y[a] == y[b]]
    # Every similarity 1: -log(e^1 / (e^1 + |N| e^1)) = log(1 + |N|), at any temperature.
    expected = sum(math.log(1 + negatives[int(y[a])]) for a, _ in pairs) / len(pairs)
    assert float(ntxent_loss(collapsed, y, temperature=0.05)) == pytest.approx(expected)
    # SupCon: log |A(i)| - 0 for anchors with a positive (5 of 6).
    assert float(supcon_loss(collapsed, y)) == pytest.approx(math.log(5))
    # Orthonormal classes: positives s = 1, negatives s = 0.
    separated = torch.eye(3, dtype=torch.float64)[y]
    t = 0.5
    expected = sum(math.log1p(negatives[int(y[a])] * math.exp(-1 / t)) for a, _ in pairs)
    assert float(ntxent_loss(separated, y, temperature=t)) == pytest.approx(expected / len(pairs))
    counts = {0: (2, 3), 1: (1, 4)}  # (|P|, |N|) of the anchors with positives
    expected = sum(
        math.log(counts[int(c)][0] * math.exp(1 / t) + counts[int(c)][1]) - 1 / t for c in y[:5]
    )
    assert float(supcon_loss(separated, y, temperature=t)) == pytest.approx(expected / 5)


@pytest.mark.parametrize("loss", [ntxent_loss, supcon_loss])
def test_small_temperature_stays_finite_in_float32(loss):
    x, y, _, _ = batch(5, n=40, dim=8)
    x32 = x.float().requires_grad_()
    value = loss(x32, y, temperature=0.01)
    (grad,) = torch.autograd.grad(value, x32)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    reference = loss(x, y, temperature=0.01)
    torch.testing.assert_close(value.double(), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "module, function, kwargs",
    [
        (NTXentLoss, ntxent_loss, {"temperature": 0.2}),
        (NPairsLoss, npairs_loss, {"l2_reg_weight": 0.01}),
        (SupConLoss, supcon_loss, {"temperature": 0.3}),
    ],
)
def test_modules_match_functions(module, function, kwargs):
    x, y, _, _ = batch(6)
    loss_fn = module(**kwargs)
    torch.testing.assert_close(loss_fn(x, y), function(x, y, **kwargs))
    assert int(loss_fn.stats.num_terms) > 0
