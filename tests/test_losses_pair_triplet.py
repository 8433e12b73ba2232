from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    all_triplets,
    contrastive_terms,
    reduce,
    triplet_category,
    triplet_terms,
)

from deepmetric import distances as dist
from deepmetric.losses import (
    REDUCTIONS,
    ContrastiveLoss,
    TripletMarginLoss,
    contrastive_loss,
    triplet_margin_loss,
)
from deepmetric.miners import AllTripletsMiner, BatchHardMiner

F64 = torch.float64


def batch(n=12, dim=3, seed=0, labels=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, dtype=F64, generator=g).requires_grad_()
    if labels is None:
        labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 5, 5, 5, 9])[:n]
    return x, labels


LABEL_SETS = {
    "mixed": torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 5, 5, 5, 9]),
    "one_class": torch.zeros(12, dtype=torch.long),
    "singletons": torch.arange(12),
    "odd_labels": torch.tensor([-7, -7, 10**12, 10**12, 3, 3, 3, -7, 42, 42, 10**12, 0]),
}


def assert_same_value_and_grad(fast, slow, x):
    torch.testing.assert_close(fast, slow)
    (g_fast,) = torch.autograd.grad(fast, x, retain_graph=True, allow_unused=True)
    (g_slow,) = torch.autograd.grad(slow, x, retain_graph=True, allow_unused=True)
    g_fast = torch.zeros_like(x) if g_fast is None else g_fast
    g_slow = torch.zeros_like(x) if g_slow is None else g_slow
    torch.testing.assert_close(g_fast, g_slow)


# ---------------------------------------------------------------- contrastive


@pytest.mark.parametrize("labels", sorted(LABEL_SETS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_contrastive_matches_reference(labels, reduction, power):
    x, y = batch(labels=LABEL_SETS[labels])
    fast = contrastive_loss(x, y, pos_margin=0.3, neg_margin=2.5, power=power, reduction=reduction)
    pos, neg = contrastive_terms(torch.cdist(x, x), y, y, True, 0.3, 2.5, power)
    slow = reduce(pos, reduction, x) + reduce(neg, reduction, x)
    assert_same_value_and_grad(fast, slow, x)


def test_contrastive_survey_form_uses_squared_distances():
    x, y = batch()
    fast = contrastive_loss(x, y, neg_margin=4.0, distance=dist.SquaredEuclideanDistance())
    pos, neg = contrastive_terms(torch.cdist(x, x) ** 2, y, y, True, 0.0, 4.0, 1)
    assert_same_value_and_grad(fast, reduce(pos, "mean", x) + reduce(neg, "mean", x), x)


def test_contrastive_with_a_similarity_turns_the_inequalities():
    x, y = batch()
    fast = contrastive_loss(x, y, pos_margin=0.9, neg_margin=0.1, distance=dist.CosineSimilarity())
    s = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    pos, neg = [], []
    for i in range(len(y)):
        for j in range(len(y)):
            if i != j and y[i] == y[j]:
                pos.append(torch.relu(0.9 - s[i, j]))
            elif y[i] != y[j]:
                neg.append(torch.relu(s[i, j] - 0.1))
    assert_same_value_and_grad(fast, reduce(pos, "mean", x) + reduce(neg, "mean", x), x)


def test_contrastive_with_indices_tuple_uses_only_those_pairs():
    x, y = batch()
    pairs = (torch.tensor([0, 3]), torch.tensor([1, 4]), torch.tensor([0, 6]), torch.tensor([3, 9]))
    fast = contrastive_loss(x, y, pairs, neg_margin=3.0)
    d = torch.cdist(x, x)
    pos = torch.stack([d[0, 1], d[3, 4]]).mean()
    neg = torch.relu(3.0 - torch.stack([d[0, 3], d[6, 9]])).mean()
    assert_same_value_and_grad(fast, pos + neg, x)


# ---------------------------------------------------------------- triplet


@pytest.mark.parametrize("labels", sorted(LABEL_SETS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smooth", [False, True])
def test_triplet_all_triplets_matches_reference(labels, reduction, smooth):
    x, y = batch(labels=LABEL_SETS[labels])
    fast = triplet_margin_loss(x, y, margin=0.7, reduction=reduction, smooth_loss=smooth)
    terms = triplet_terms(torch.cdist(x, x), y, y, True, 0.7, smooth=smooth)
    assert_same_value_and_grad(fast, reduce(terms, reduction, x), x)


@pytest.mark.parametrize("smooth", [False, True])
def test_triplet_swap_matches_reference(smooth):
    x, y = batch(seed=3)
    fast = triplet_margin_loss(x, y, margin=0.5, swap=True, smooth_loss=smooth)
    d = torch.cdist(x, x)
    terms = triplet_terms(d, y, y, True, 0.5, smooth=smooth, swap_d=d)
    assert_same_value_and_grad(fast, reduce(terms, "mean", x), x)


@pytest.mark.parametrize(
    "distance",
    [dist.SquaredEuclideanDistance(), dist.CosineSimilarity(), dist.ManhattanDistance()],
    ids=["squared", "cosine", "manhattan"],
)
def test_triplet_with_other_distances(distance):
    x, y = batch(seed=5)
    fast = triplet_margin_loss(x, y, margin=0.3, distance=distance)
    d = distance.as_dissimilarity(distance(x))
    assert_same_value_and_grad(fast, reduce(triplet_terms(d, y, y, True, 0.3), "mean", x), x)


def test_triplet_with_ref_emb_whose_labels_are_absent_from_the_batch():
    x, y = batch(n=6, labels=torch.tensor([0, 0, 1, 1, 7, 8]))
    g = torch.Generator().manual_seed(9)
    ref = torch.randn(9, 3, dtype=F64, generator=g).requires_grad_()
    ref_y = torch.tensor([0, 1, 1, 2, 3, 3, 0, 8, 4])
    fast = triplet_margin_loss(x, y, ref_emb=ref, ref_labels=ref_y, margin=0.4)
    slow = reduce(triplet_terms(torch.cdist(x, ref), y, ref_y, False, 0.4), "mean", x)
    assert_same_value_and_grad(fast, slow, x)
    assert_same_value_and_grad(fast, slow, ref)


def test_triplet_statistics_match_the_seed_definitions():
    x, y = batch(seed=7)
    loss_fn = TripletMarginLoss(margin=0.8)
    loss_fn(x, y)
    d = torch.cdist(x, x)
    kinds = [triplet_category(d[a, p], d[a, n], 0.8) for a, p, n in all_triplets(y, y, True)]
    stats = loss_fn.stats
    assert int(stats.num_triplets) == len(kinds)
    assert int(stats.num_easy) == kinds.count("easy")
    assert int(stats.num_semihard) == kinds.count("semihard")
    assert int(stats.num_hard) == kinds.count("hard")
    assert int(stats.num_active) == len(kinds) - kinds.count("easy")


def test_triplet_with_mined_and_pair_tuples_equals_listing_them():
    x, y = batch(seed=11)
    mined = BatchHardMiner()(x, y)
    d = torch.cdist(x, x)
    slow = torch.stack(
        [torch.relu(d[a, p] - d[a, n] + 0.2) for a, p, n in zip(*mined, strict=True)]
    )
    assert_same_value_and_grad(triplet_margin_loss(x, y, mined), slow.mean(), x)
    everything = AllTripletsMiner()(x, y)
    assert_same_value_and_grad(
        triplet_margin_loss(x, y, everything, margin=0.6), triplet_margin_loss(x, y, margin=0.6), x
    )
    a, p, n = everything
    positive_pairs = torch.unique(torch.stack([a, p]), dim=1)
    negative_pairs = torch.unique(torch.stack([a, n]), dim=1)
    fast = triplet_margin_loss(x, y, (*positive_pairs, *negative_pairs), margin=0.6)
    assert_same_value_and_grad(fast, triplet_margin_loss(x, y, margin=0.6), x)


@settings(max_examples=30, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=14),
    seed=st.integers(0, 10**6),
    margin=st.floats(0.0, 3.0),
    duplicate=st.booleans(),
)
def test_triplet_property_all_triplets_equal_reference(labels, seed, margin, duplicate):
    y = torch.tensor(labels)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(y), 2, dtype=F64, generator=g)
    if duplicate and len(y) > 2:
        x[1] = x[0]
    x.requires_grad_()
    fast = triplet_margin_loss(x, y, margin=margin, reduction="sum")
    slow = reduce(triplet_terms(torch.cdist(x, x), y, y, True, margin), "sum", x)
    torch.testing.assert_close(fast, slow)
    (grad,) = torch.autograd.grad(fast, x)
    assert torch.isfinite(grad).all()


# ---------------------------------------------------------------- shared behaviour


LOSSES = {
    "contrastive": ContrastiveLoss(),
    "triplet": TripletMarginLoss(),
    "triplet_smooth": TripletMarginLoss(smooth_loss=True),
}


@pytest.mark.parametrize("name", ["triplet", "triplet_smooth"])
@pytest.mark.parametrize("labels", ["one_class", "singletons"])
def test_no_valid_triplet_gives_zero_loss_that_backpropagates(name, labels):
    x, _ = batch()
    loss = LOSSES[name](x, LABEL_SETS[labels])
    assert loss.item() == 0
    loss.backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_batch_of_one_and_duplicates(name):
    x = torch.ones(1, 4, dtype=F64, requires_grad=True)
    loss = LOSSES[name](x, torch.tensor([3]))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(x.grad).all()
    x = torch.ones(6, 4, dtype=F64).requires_grad_()
    loss = LOSSES[name](x, torch.tensor([0, 0, 1, 1, 2, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_inputs_compute_in_float32_and_return_input_dtype(name, dtype):
    x, y = batch()
    x16 = x.detach().to(dtype).requires_grad_()
    loss = LOSSES[name](x16, y)
    assert loss.dtype == dtype
    reference = LOSSES[name](x16.detach().float(), y)
    torch.testing.assert_close(loss.float(), reference, atol=2e-2, rtol=2e-2)
    loss.backward()
    assert torch.isfinite(x16.grad.float()).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_non_contiguous_input(name):
    x, y = batch()
    wide = torch.randn(12, 6, dtype=F64)[:, ::2].requires_grad_()
    assert not wide.is_contiguous()
    torch.testing.assert_close(LOSSES[name](wide, y), LOSSES[name](wide.contiguous(), y))
    del x


BAD_CALLS = [
    (lambda f: f(torch.randn(5), torch.arange(5)), ValueError, "2-D"),
    (lambda f: f(torch.randn(0, 3), torch.arange(0)), ValueError, "empty"),
    (lambda f: f(torch.randn(4, 3), torch.arange(5)), ValueError, "5 entries but embeddings has 4"),
    (lambda f: f(torch.randn(4, 3), torch.zeros(4, 1)), ValueError, "1-D"),
    (lambda f: f(torch.randn(4, 3), torch.tensor([0.0, 1, 0, 1])), TypeError, "integers"),
    (lambda f: f(torch.tensor([[float("nan"), 0.0]] * 4), torch.arange(4)), ValueError, "NaN"),
    (lambda f: f(torch.randn(4, 3), None), ValueError, "labels are required"),
    (
        lambda f: f(torch.randn(4, 3), torch.arange(4), ref_emb=torch.randn(2, 4)),
        ValueError,
        "features",
    ),
    (
        lambda f: f(torch.randn(4, 3), torch.arange(4), ref_emb=torch.randn(2, 3)),
        ValueError,
        "ref_labels",
    ),
    (
        lambda f: f(torch.randn(4, 3), torch.arange(4), (torch.tensor([0]),) * 2),
        ValueError,
        "tuple of 3",
    ),
    (
        lambda f: f(torch.randn(4, 3), torch.arange(4), (torch.tensor([9]),) * 3),
        IndexError,
        "outside",
    ),
    (lambda f: f(torch.randn(4, 3), "abc"), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("case", range(len(BAD_CALLS)))
def test_bad_input_raises_a_clear_error(name, case):
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call(LOSSES[name])


def test_hyper_parameters_out_of_range_are_refused():
    with pytest.raises(ValueError, match="margin"):
        TripletMarginLoss(margin=-0.1)
    with pytest.raises(ValueError, match="pos_margin"):
        ContrastiveLoss(pos_margin=2.0, neg_margin=1.0)
    with pytest.raises(ValueError, match="pos_margin"):
        ContrastiveLoss(pos_margin=0.1, neg_margin=0.5, distance=dist.CosineSimilarity())
    with pytest.raises(ValueError, match="power"):
        ContrastiveLoss(power=0.5)
    with pytest.raises(ValueError, match="reduction"):
        TripletMarginLoss(reduction="avg")
