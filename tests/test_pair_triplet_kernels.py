"""The fast paths behind the pair and triplet losses and the miners (issue 2): the fused
Euclidean matrix, per-bound counting (comparisons and `searchsorted`), blocked autograd
Functions. Each is checked against a plain form, with blocks made small so that every
multi-block path runs on test-sized inputs."""

from __future__ import annotations

import pytest
import torch
from reference import contrastive_terms, reduce, triplet_terms

from deepmetric import blocks as blocks_module
from deepmetric import distances as dist
from deepmetric import miners, triplet_counting
from deepmetric.losses import contrastive_loss, pair_triplet, triplet_margin_loss
from deepmetric.losses._blocks import setup_pairs

F64 = torch.float64


@pytest.fixture(params=["one block", "small blocks"])
def blocks(request, monkeypatch):
    """Run a test with the default blocks and again with blocks of a few rows."""
    if request.param == "small blocks":
        monkeypatch.setattr(blocks_module, "BLOCK_ELEMENTS", 40)
        monkeypatch.setattr(blocks_module, "PASS_BLOCK_ELEMENTS", 24)
        monkeypatch.setattr(blocks_module, "SWEEP_BLOCK_ELEMENTS", 30)
    return request.param


@pytest.fixture(params=["comparisons", "searchsorted"])
def counting(request, monkeypatch):
    """Run a test with per-bound comparisons and again with `searchsorted` for every K."""
    if request.param == "searchsorted":
        monkeypatch.setattr(triplet_counting, "SEARCH_ABOVE", 0)
    return request.param


def unfused_euclidean(query, ref, root=True):
    squared = (
        torch.addmm(ref.pow(2).sum(dim=1).unsqueeze(0), query, ref.T, alpha=-2)
        .add(query.pow(2).sum(dim=1, keepdim=True))
        .clamp_min(0)
    )
    if query is ref:
        squared = squared * (1 - torch.eye(len(query), dtype=query.dtype))
    return dist.safe_sqrt(squared) if root else squared


def points_with_duplicates(n=9, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, dtype=F64, generator=g)
    x[3] = x[0]
    x[7] = x[5]
    return x


@pytest.mark.parametrize("root", [True, False], ids=["euclidean", "squared"])
def test_fused_euclidean_matches_the_unfused_form(blocks, root):
    fused = dist.euclidean_matrix if root else dist.squared_euclidean_matrix
    q = points_with_duplicates().requires_grad_()
    r = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    r = torch.cat([r, q[:2].detach()]).requires_grad_()
    w = torch.randn(9, 9, dtype=F64, generator=torch.Generator().manual_seed(2))
    for a, b in ((q, r), (q, q)):
        fast, slow = fused(a, b), unfused_euclidean(a, b, root)
        torch.testing.assert_close(fast, slow)
        inputs = (a,) if a is b else (a, b)
        weights = w[: fast.shape[0], : fast.shape[1]]
        fast_grads = torch.autograd.grad((fast * weights).sum(), inputs)
        slow_grads = torch.autograd.grad((slow * weights).sum(), inputs)
        for fast_grad, slow_grad in zip(fast_grads, slow_grads, strict=True):
            assert torch.isfinite(fast_grad).all()
            torch.testing.assert_close(fast_grad, slow_grad)
    assert (dist.euclidean_matrix(q, q).diagonal() == 0).all()


def test_fused_euclidean_passes_gradcheck(blocks):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 3, dtype=F64, generator=g).requires_grad_()
    r = torch.randn(4, 3, dtype=F64, generator=g).requires_grad_()
    for fused in (dist.euclidean_matrix, dist.squared_euclidean_matrix):
        assert torch.autograd.gradcheck(fused, (q, r))
        assert torch.autograd.gradcheck(lambda a, f=fused: f(a, a), (q,))


def test_zero_distances_get_zero_weight(blocks):
    """A duplicate pair and the diagonal pass no gradient, whatever the upstream gradient."""
    x = points_with_duplicates().requires_grad_()
    d = dist.euclidean_matrix(x, x)
    mask = torch.zeros_like(d)
    mask[0, 3] = mask[3, 0] = mask[5, 7] = mask[1, 1] = 1.0
    (grad,) = torch.autograd.grad((d * mask).sum(), x)
    assert (grad == 0).all()


def test_count_above_both_ways_match_brute_force(monkeypatch):
    g = torch.Generator().manual_seed(4)
    bounds = torch.randint(0, 6, (5, 7), generator=g).to(F64)
    valid = torch.rand(5, 7, generator=g) > 0.3
    block = torch.randint(0, 7, (5, 11), generator=g).to(F64)
    above = ((bounds.unsqueeze(1) > block.unsqueeze(2)) & valid.unsqueeze(1)).sum(dim=2)
    below = (block.unsqueeze(1) < bounds.unsqueeze(2)).sum(dim=2) * valid
    for search_above in (24, 0):
        monkeypatch.setattr(triplet_counting, "SEARCH_ABOVE", search_above)
        counts, per_bound = triplet_counting.count_above(bounds, valid, block, per_bound=True)
        assert torch.equal(counts, above.to(F64))
        assert torch.equal(per_bound, below.to(F64))


def batch(n=20, classes=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, dtype=F64, generator=g)
    x[4] = x[0]  # a zero distance between positives or negatives
    return x.requires_grad_(), torch.randint(0, classes, (n,), generator=g)


def assert_same(fast, slow, x):
    torch.testing.assert_close(fast, slow)
    (g_fast,) = torch.autograd.grad(fast, x, retain_graph=True)
    (g_slow,) = torch.autograd.grad(slow, x, retain_graph=True)
    torch.testing.assert_close(g_fast, g_slow)


@pytest.mark.parametrize("smooth", [False, True], ids=["hinge", "soft-plus"])
def test_all_triplets_match_reference_in_blocks_and_both_counting_ways(blocks, counting, smooth):
    x, y = batch()
    fast, stats = triplet_margin_loss(
        x, y, margin=0.4, smooth_loss=smooth, reduction="sum", return_stats=True
    )
    d = torch.cdist(x, x)
    assert_same(fast, reduce(triplet_terms(d, y, y, True, 0.4, smooth=smooth), "sum", x), x)
    terms = triplet_terms(d.detach(), y, y, True, 0.4)
    hard = triplet_terms(d.detach(), y, y, True, 0.0)  # [d_ap - d_an]+ > 0: hard
    assert int(stats.num_triplets) == len(terms)
    assert int(stats.num_active) == sum(1 for t in terms if t > 0)
    assert int(stats.num_hard) == sum(1 for t in hard if t > 0)


def test_triplet_with_a_reference_set_in_blocks(blocks, counting):
    x, y = batch(n=12, classes=5)
    g = torch.Generator().manual_seed(6)
    ref = torch.randn(24, 3, dtype=F64, generator=g).requires_grad_()
    ref_y = torch.randint(0, 3, (24,), generator=g)  # labels 3 and 4 of the batch are absent
    for smooth in (False, True):
        fast = triplet_margin_loss(x, y, ref_emb=ref, ref_labels=ref_y, smooth_loss=smooth)
        slow = triplet_terms(torch.cdist(x, ref), y, ref_y, False, 0.2, smooth=smooth)
        assert_same(fast, reduce(slow, "mean", x), x)
        assert_same(fast, reduce(slow, "mean", x), ref)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_contrastive_with_a_reference_set_in_blocks(blocks, power):
    x, y = batch(n=12, classes=5)
    g = torch.Generator().manual_seed(7)
    ref = torch.randn(24, 3, dtype=F64, generator=g).requires_grad_()
    ref_y = torch.randint(0, 3, (24,), generator=g)
    fast = contrastive_loss(
        x, y, ref_emb=ref, ref_labels=ref_y, pos_margin=0.5, neg_margin=2.0, power=power
    )
    d = torch.cdist(x, ref)
    same = y.unsqueeze(1) == ref_y.unsqueeze(0)
    pos = (d - 0.5).clamp_min(0).pow(power)[same]
    neg = (2.0 - d).clamp_min(0).pow(power)[~same]
    slow = pos.sum() / max(len(pos), 1) + neg.sum() / max(len(neg), 1)
    assert_same(fast, slow, x)
    assert_same(fast, slow, ref)


@pytest.fixture(params=["one block", "listed positives", "counting pass"])
def nonzero_mean_path(request, monkeypatch):
    """Run a contrastive nonzero_mean test on each of its three paths: the test batches are
    one block by default; the other two paths are forced, with blocks of a few rows."""
    if request.param != "one block":
        monkeypatch.setattr(blocks_module, "PASS_BLOCK_ELEMENTS", 24)
        monkeypatch.setattr(blocks_module, "SWEEP_BLOCK_ELEMENTS", 30)
        monkeypatch.setattr(pair_triplet, "_nonzero_mean_path", lambda *_: request.param)
    return request.param


def slow_contrastive(d, y, ref_y, ref_is_query, pos_margin, neg_margin, power, like):
    pos, neg = contrastive_terms(d, y, ref_y, ref_is_query, pos_margin, neg_margin, power)
    active = [sum(1 for t in terms if t > 0) for terms in (pos, neg)]
    return reduce(pos, "nonzero_mean", like) + reduce(neg, "nonzero_mean", like), active


@pytest.mark.parametrize("classes", [1, 3, 20], ids=["one class", "three classes", "singletons"])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_contrastive_nonzero_mean_matches_reference_on_every_path(
    nonzero_mean_path, classes, power
):
    x, y = batch(classes=classes)
    if classes == 20:
        y = torch.arange(20)
    fast, stats = contrastive_loss(
        x,
        y,
        pos_margin=0.5,
        neg_margin=2.0,
        power=power,
        reduction="nonzero_mean",
        return_stats=True,
    )
    slow, active = slow_contrastive(torch.cdist(x, x), y, y, True, 0.5, 2.0, power, x)
    assert_same(fast, slow, x)
    assert [int(stats.num_active_pos_pairs), int(stats.num_active_neg_pairs)] == active


def test_contrastive_nonzero_mean_with_a_reference_set_and_a_similarity(nonzero_mean_path):
    x, y = batch(n=12, classes=4)
    g = torch.Generator().manual_seed(11)
    ref = torch.randn(16, 3, dtype=F64, generator=g).requires_grad_()
    ref_y = torch.randint(0, 4, (16,), generator=g)
    cosine = dist.CosineSimilarity()
    fast = contrastive_loss(
        x,
        y,
        ref_emb=ref,
        ref_labels=ref_y,
        pos_margin=0.8,
        neg_margin=0.2,
        distance=cosine,
        reduction="nonzero_mean",
    )
    s = cosine(x, ref)
    same = y.unsqueeze(1) == ref_y.unsqueeze(0)
    pos, neg = (0.8 - s).clamp_min(0)[same], (s - 0.2).clamp_min(0)[~same]
    slow = pos.sum() / (pos > 0).sum().clamp_min(1) + neg.sum() / (neg > 0).sum().clamp_min(1)
    assert_same(fast, slow, x)
    assert_same(fast, slow, ref)


def test_contrastive_nonzero_mean_with_label_sets_relevance_and_item_ids(nonzero_mean_path):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(10, 3, dtype=F64, generator=g).requires_grad_()
    hot = torch.rand(10, 4, generator=g) < 0.4
    relevance = torch.randint(0, 3, (10, 10), generator=g)
    ids = torch.tensor([0, 1, 2, 3, 3, 4, 5, 6, 7, 7])  # rows 3, 4 and rows 8, 9: one item each
    for copy, item in ((4, 3), (9, 8)):  # an item has one label set and one relevance row
        hot[copy] = hot[item]
        relevance[copy], relevance[:, copy] = relevance[item], relevance[:, item]
    d = torch.cdist(x, x)

    def slow(positive):
        pos, neg = [], []
        for i in range(10):
            for j in range(10):
                if ids[i] == ids[j]:
                    continue
                if positive[i, j]:
                    pos.append(torch.relu(d[i, j] - 0.3))
                else:
                    neg.append(torch.relu(2.0 - d[i, j]))
        return reduce(pos, "nonzero_mean", x) + reduce(neg, "nonzero_mean", x)

    shared = (hot.double() @ hot.double().T) > 0
    for pairing, positive in (({"labels": hot}, shared), ({"relevance": relevance}, relevance > 0)):
        fast = contrastive_loss(
            x, **pairing, query_ids=ids, pos_margin=0.3, neg_margin=2.0, reduction="nonzero_mean"
        )
        assert_same(fast, slow(positive), x)


def test_contrastive_nonzero_mean_has_second_derivatives(nonzero_mean_path):
    x, y = batch(n=10, classes=3, seed=10)
    x = x.detach().clone()
    x[4] += 0.1  # no duplicate points: the distance is not differentiable at 0
    x.requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda a: contrastive_loss(a, y, neg_margin=2.5, reduction="nonzero_mean"), (x,)
    )


def test_contrastive_nonzero_mean_path_follows_the_batch():
    x = torch.randn(2048, 8)
    pk, one_class = torch.arange(2048) // 4, torch.zeros(2048, dtype=torch.long)
    # gathered rows: 2048 x 3 x 8 entries for P x K (K = 4), 2048 x 2047 x 8 for one class
    for rows, labels, path in (
        (64, pk[:64], "one block"),
        (2048, pk, "listed positives"),
        (2048, one_class, "counting pass"),
    ):
        inputs, pairs, sweep = setup_pairs(
            x[:rows], labels, None, None, None, dist.EuclideanDistance()
        )
        assert pair_triplet._nonzero_mean_path(sweep, inputs, pairs.relation) == path


@pytest.fixture(params=["pairs' own distances", "whole matrix"])
def mined_distances(request, monkeypatch):
    """Run a mined-tuple test with the listed pairs' own distances and with the whole matrix."""
    few = request.param == "pairs' own distances"
    monkeypatch.setattr(pair_triplet, "few_pairs", lambda *sizes: few)
    return request.param


@pytest.mark.parametrize("swap", [False, True], ids=["plain", "anchor swap"])
@pytest.mark.parametrize("smooth", [False, True], ids=["hinge", "soft-plus"])
def test_mined_triplets_match_the_loop_on_both_distance_paths(mined_distances, swap, smooth):
    x, y = batch()
    anchor, positive, negative = miners.AllTripletsMiner()(x.detach(), y)
    keep = torch.arange(len(anchor)) % 3 == 0  # a subset, with an anchor listed many times
    mined = (anchor[keep], positive[keep], negative[keep])
    fast, stats = triplet_margin_loss(
        x, y, mined, margin=0.4, swap=swap, smooth_loss=smooth, return_stats=True
    )
    d = torch.cdist(x, x)
    terms = []
    for a, p, n in zip(*mined, strict=True):
        d_an = torch.minimum(d[a, n], d[p, n]) if swap else d[a, n]
        value = d[a, p] - d_an + 0.4
        terms.append(torch.nn.functional.softplus(value) if smooth else torch.relu(value))
    assert_same(fast, reduce(terms, "mean", x), x)
    assert int(stats.num_triplets) == len(terms)


def test_mined_pairs_with_repeats_and_a_reference_set_on_both_distance_paths(mined_distances):
    x, y = batch(n=12, classes=4)
    g = torch.Generator().manual_seed(13)
    ref = torch.randn(10, 3, dtype=F64, generator=g).requires_grad_()
    ref_y = torch.randint(0, 4, (10,), generator=g)
    # (a1, p, a2, n), the pair (2, 5) listed twice: each listed pair counts (as in pml)
    pairs = (
        torch.tensor([0, 2, 2, 7]),
        torch.tensor([1, 5, 5, 9]),
        torch.tensor([3, 4, 11]),
        torch.tensor([0, 8, 6]),
    )
    cosine = dist.CosineSimilarity()
    fast = contrastive_loss(
        x,
        y,
        pairs,
        ref_emb=ref,
        ref_labels=ref_y,
        pos_margin=0.9,
        neg_margin=0.1,
        distance=cosine,
    )
    s = cosine(x, ref)
    pos = torch.relu(0.9 - s[pairs[0], pairs[1]]).mean()
    neg = torch.relu(s[pairs[2], pairs[3]] - 0.1).mean()
    assert_same(fast, pos + neg, x)
    assert_same(fast, pos + neg, ref)


def test_few_mined_pairs_skip_the_matrix_and_many_read_it():
    assert pair_triplet.few_pairs(num_pairs=2048, width=128, num_query=1024, num_ref=1024)
    assert not pair_triplet.few_pairs(num_pairs=10**6, width=128, num_query=1024, num_ref=1024)
    # 256 x 256: a batch-hard miner's 512 pairs are few, a pair-margin miner's 1,792 are not
    assert pair_triplet.few_pairs(num_pairs=512, width=128, num_query=256, num_ref=256)
    assert not pair_triplet.few_pairs(num_pairs=1792, width=128, num_query=256, num_ref=256)


def test_miners_do_not_depend_on_blocks_or_counting(monkeypatch):
    x, y = batch(n=40, classes=3)
    x = x.detach()

    def mine_all():
        return [
            miners.TripletMarginMiner(0.5, kind)(x, y) for kind in ("all", "hard", "semihard")
        ] + [
            miners.BatchHardMiner()(x, y),
            miners.HardNetMiner()(x, y),
            miners.PairMarginMiner(0.5, 1.5)(x, y),
            miners.DistanceWeightedMiner(generator=torch.Generator().manual_seed(0))(x, y),
            miners.RankWindowMiner((2, 9), 2, generator=torch.Generator().manual_seed(0))(x, y),
        ]

    expected = mine_all()
    monkeypatch.setattr(blocks_module, "BLOCK_ELEMENTS", 40)
    monkeypatch.setattr(blocks_module, "PASS_BLOCK_ELEMENTS", 24)
    monkeypatch.setattr(triplet_counting, "SEARCH_ABOVE", 0)
    for got, want in zip(mine_all(), expected, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("smooth", [False, True], ids=["hinge", "soft-plus"])
@pytest.mark.parametrize("reduction", ["mean", "nonzero_mean", "sum"])
def test_swap_matches_reference_in_blocks(blocks, smooth, reduction):
    x, y = batch()
    y = y.clone()
    y[4] = y[0]  # x[4] = x[0]: min(d(a, n), d(p, n)) ties for this pair, half to each side
    fast, stats = triplet_margin_loss(
        x, y, margin=0.4, swap=True, smooth_loss=smooth, reduction=reduction, return_stats=True
    )
    d = torch.cdist(x, x)
    slow = triplet_terms(d, y, y, True, 0.4, smooth=smooth, swap_d=d)
    assert_same(fast, reduce(slow, reduction, x), x)
    hinge = triplet_terms(d.detach(), y, y, True, 0.4, swap_d=d.detach())
    hard = triplet_terms(d.detach(), y, y, True, 0.0, swap_d=d.detach())
    assert int(stats.num_triplets) == len(hinge)
    assert int(stats.num_active) == sum(1 for t in hinge if t > 0)
    assert int(stats.num_hard) == sum(1 for t in hard if t > 0)


def test_swap_with_a_reference_set_in_blocks(blocks):
    x, y = batch(n=12, classes=5)
    g = torch.Generator().manual_seed(8)
    ref = torch.randn(24, 3, dtype=F64, generator=g)
    ref_y = torch.randint(0, 3, (24,), generator=g)
    # A reference copy of anchor 0 with its label: d(0, n) = S(copy, n), a tie in the swap.
    ref[5], ref_y[5] = x[0].detach(), y[0]
    ref.requires_grad_()
    for smooth in (False, True):
        fast = triplet_margin_loss(
            x, y, ref_emb=ref, ref_labels=ref_y, swap=True, smooth_loss=smooth
        )
        d, swap_d = torch.cdist(x, ref), torch.cdist(ref, ref)
        slow = triplet_terms(d, y, ref_y, False, 0.2, smooth=smooth, swap_d=swap_d)
        assert_same(fast, reduce(slow, "mean", x), x)
        assert_same(fast, reduce(slow, "mean", x), ref)


def test_fused_euclidean_has_second_derivatives():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(5, 3, dtype=F64, generator=g).requires_grad_()
    r = torch.randn(4, 3, dtype=F64, generator=g).requires_grad_()
    for fused in (dist.euclidean_matrix, dist.squared_euclidean_matrix):
        assert torch.autograd.gradgradcheck(fused, (q, r))
        assert torch.autograd.gradgradcheck(lambda a, f=fused: f(a, a), (q,))


@pytest.mark.parametrize(
    "loss",
    [
        lambda x, y: contrastive_loss(x, y, pos_margin=0.3, neg_margin=2.5),
        lambda x, y: contrastive_loss(x, y, pos_margin=0.3, neg_margin=2.5, power=2.0),
        lambda x, y: triplet_margin_loss(x, y, margin=0.5),
        lambda x, y: triplet_margin_loss(x, y, margin=0.5, smooth_loss=True),
        lambda x, y: triplet_margin_loss(x, y, margin=0.5, swap=True, smooth_loss=True),
    ],
    ids=["contrastive", "contrastive-squared-hinge", "hinge", "soft-plus", "swap"],
)
def test_losses_have_second_derivatives(loss):
    """A gradient penalty works: the backward replays the loss by differentiable steps."""
    x, y = batch(n=10, classes=3, seed=10)
    x = x.detach().clone()
    x[4] += 0.1  # no duplicate points: the distance is not differentiable at 0
    x.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a: loss(a, y), (x,))


@pytest.mark.parametrize("root", [True, False], ids=["euclidean", "squared"])
def test_row_blocks_of_a_set_against_itself_match_the_whole_matrix(root):
    """`compute_block` with `same_set`: exact zeros at (i, rows.start + i), and the same
    values and gradients as the rows of the whole matrix."""
    distance = dist.EuclideanDistance() if root else dist.SquaredEuclideanDistance()
    x = points_with_duplicates().requires_grad_()
    weights = torch.randn(9, 9, dtype=F64, generator=torch.Generator().manual_seed(2))
    whole = distance.compute_matrix(x, x)
    (expected,) = torch.autograd.grad((whole[3:7] * weights[3:7]).sum(), x)
    block = distance.compute_block(x, x, slice(3, 7), True)
    assert torch.equal(block.diagonal(3), torch.zeros(4, dtype=F64))
    torch.testing.assert_close(block, whole[3:7])
    (grad,) = torch.autograd.grad((block * weights[3:7]).sum(), x)
    torch.testing.assert_close(grad, expected)
    apart = torch.randn(9, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    assert torch.autograd.gradgradcheck(
        lambda a: distance.compute_block(a, a, slice(3, 7), True), (apart.requires_grad_(),)
    )
