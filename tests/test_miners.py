from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import all_triplets, is_positive, triplet_category

from deepmetric import blocks as miners_blocks
from deepmetric import distances as dist
from deepmetric import miners

F64 = torch.float64


def batch(n=16, dim=4, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, dtype=F64, generator=g), torch.arange(n) % classes


def as_set(tuples):
    return set(zip(*(t.tolist() for t in tuples), strict=True))


@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
@pytest.mark.parametrize("distance", [dist.EuclideanDistance(), dist.CosineSimilarity()])
def test_triplet_margin_miner_matches_the_definitions(kind, distance):
    x, y = batch(seed=1)
    mined = miners.TripletMarginMiner(margin=0.3, type_of_triplets=kind, distance=distance)(x, y)
    d = distance.as_dissimilarity(distance(x))
    expected = set()
    for a, p, n in all_triplets(y, y, True):
        category = triplet_category(d[a, p], d[a, n], 0.3)
        if kind == category or (kind == "all" and category != "easy"):
            expected.add((a, p, n))
    assert as_set(mined) == expected
    assert len(mined[0]) == len(expected)  # no duplicates


def test_all_triplets_miner_with_reference_set():
    x, y = batch(n=6, seed=2)
    ref, ref_y = batch(n=9, seed=3, classes=5)
    mined = miners.AllTripletsMiner()(x, y, ref, ref_y)
    assert as_set(mined) == set(all_triplets(y, ref_y, False))
    assert mined.reference_key[0] == "ref_emb"


def test_pair_miners():
    x, y = batch(seed=4)
    d = torch.cdist(x, x)
    a1, p, a2, n = miners.AllPairsMiner()(x, y)
    pos = {(i, j) for i in range(16) for j in range(16) if is_positive(y, y, i, j, True)}
    neg = {(i, j) for i in range(16) for j in range(16) if y[i] != y[j]}
    assert set(zip(a1.tolist(), p.tolist(), strict=True)) == pos
    assert set(zip(a2.tolist(), n.tolist(), strict=True)) == neg
    a1, p, a2, n = miners.PairMarginMiner(pos_margin=2.0, neg_margin=2.5)(x, y)
    assert set(zip(a1.tolist(), p.tolist(), strict=True)) == {q for q in pos if d[q] > 2.0}
    assert set(zip(a2.tolist(), n.tolist(), strict=True)) == {q for q in neg if d[q] < 2.5}


def test_batch_hard_miner_picks_farthest_positive_and_nearest_negative():
    x, y = batch(seed=5)
    y[0] = 99  # an anchor without positives is skipped
    a, p, n = miners.BatchHardMiner()(x, y)
    d = torch.cdist(x, x)
    assert 0 not in a.tolist()
    for anchor, pos, neg in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        positives = [j for j in range(16) if is_positive(y, y, anchor, j, True)]
        negatives = [j for j in range(16) if y[j] != y[anchor]]
        assert d[anchor, pos] == max(d[anchor, j] for j in positives)
        assert d[anchor, neg] == min(d[anchor, j] for j in negatives)


def test_hardnet_miner_takes_the_nearest_negative_of_either_member():
    x, y = batch(seed=6, classes=8)
    first, second, neg = miners.HardNetMiner()(x, y)
    d = torch.cdist(x, x)
    expected = {}
    for a in range(16):
        for p in range(16):
            if is_positive(y, y, a, p, True):
                negatives = [j for j in range(16) if y[j] != y[a]]
                best = min(min(d[a, j], d[p, j]) for j in negatives)
                expected[(a, p)] = best
    assert len(first) == len(expected)
    for f, s, n in zip(first.tolist(), second.tolist(), neg.tolist(), strict=True):
        assert d[f, n] == expected.get((f, s), expected.get((s, f)))
    with pytest.raises(ValueError, match="within the batch"):
        miners.HardNetMiner()(x, y, x.clone(), y)


@pytest.mark.parametrize("layout", ["one class", "two classes", "long tail"])
@pytest.mark.parametrize("distance", [dist.EuclideanDistance(), dist.CosineSimilarity()])
@pytest.mark.parametrize("block_rows", [None, 1])
def test_hardest_miners_with_large_classes(layout, distance, block_rows, monkeypatch):
    """Batch-hard and HardNet read each block of rows' own positive lists (never a global
    (N, K) table): with one class, two classes or a long tail, in one block or in blocks of
    one row, they match loops over the pairs."""
    if block_rows:
        monkeypatch.setattr(miners_blocks, "PASS_BLOCK_ELEMENTS", 13 * block_rows)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(13, 3, dtype=F64, generator=gen)
    y = {
        "one class": torch.zeros(13, dtype=torch.long),
        "two classes": torch.arange(13) % 2,
        "long tail": torch.tensor([0] * 8 + [1] * 3 + [2, 3]),
    }[layout]
    d = distance.as_dissimilarity(distance(x))
    positives = {a: [j for j in range(13) if is_positive(y, y, a, j, True)] for a in range(13)}
    negatives = {a: [j for j in range(13) if y[j] != y[a]] for a in range(13)}
    expected = {
        (a, max(positives[a], key=lambda j: d[a, j]), min(negatives[a], key=lambda j: d[a, j]))
        for a in range(13)
        if positives[a] and negatives[a]
    }
    assert as_set(miners.BatchHardMiner(distance=distance)(x, y)) == expected
    nearest = {a: min((d[a, j], j) for j in negatives[a]) for a in range(13) if negatives[a]}
    expected = set()
    for a in nearest:
        for p in positives[a]:
            first, second = (p, a) if nearest[p][0] < nearest[a][0] else (a, p)
            expected.add((first, second, nearest[first][1]))
    mined = miners.HardNetMiner(distance=distance)(x, y)
    assert as_set(mined) == expected
    assert len(mined[0]) == sum(len(positives[a]) for a in nearest)


def test_distance_weighted_miner_follows_inverse_density():
    torch.manual_seed(3)
    dim = 6
    x = torch.nn.functional.normalize(torch.randn(40, dim, dtype=F64), dim=1)
    y = torch.cat([torch.zeros(32, dtype=torch.long), torch.arange(1, 9)])  # 31 draws per call
    miner = miners.DistanceWeightedMiner(
        cutoff=0.5, nonzero_loss_cutoff=1.4, generator=torch.Generator().manual_seed(1)
    )
    d = torch.cdist(x, x)
    anchor = 0
    negatives = [j for j in range(40) if y[j] != y[anchor] and d[anchor, j] < 1.4]
    assert len(negatives) >= 3

    def inverse_q(value):
        value = max(value, 0.5)
        return 1 / (value ** (dim - 2) * (1 - value**2 / 4) ** ((dim - 3) / 2))

    weights = torch.tensor([inverse_q(float(d[anchor, j])) for j in negatives], dtype=F64)
    expected = weights / weights.sum()
    counts = Counter()
    for _ in range(100):
        a, _, n = miner(x, y)
        counts.update(n[a == anchor].tolist())
    total = sum(counts.values())
    assert total == 3100 and set(counts) <= set(negatives)
    observed = torch.tensor([counts[j] / total for j in negatives], dtype=F64)
    assert (observed - expected).abs().max() < 0.04


def test_distance_weighted_miner_falls_back_to_uniform_and_validates():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    y = torch.tensor([0, 0, 1, 1])
    a, p, n = miners.DistanceWeightedMiner()(x, y)  # all negatives at distance 2 >= 1.4
    assert len(a) == 4 and all(y[i] != y[j] for i, j in zip(a, n, strict=True))
    with pytest.raises(ValueError, match="cutoff"):
        miners.DistanceWeightedMiner(cutoff=1.5, nonzero_loss_cutoff=1.4)


def test_rank_window_miner_draws_from_the_window():
    x, y = batch(n=40, seed=7, classes=4)
    miner = miners.RankWindowMiner(
        window=(3, 6), negatives_per_positive=3, generator=torch.Generator().manual_seed(0)
    )
    a, p, n = miner(x, y)
    d = torch.cdist(x, x)
    for anchor, pos, neg in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        assert is_positive(y, y, anchor, pos, True)
        negatives = sorted((float(d[anchor, j]), j) for j in range(40) if y[j] != y[anchor])
        assert neg in [j for _, j in negatives[2:6]]
    assert len(a) == 40 * 9 * 3
    with pytest.raises(ValueError, match="window"):
        miners.RankWindowMiner(window=(5, 2))
    short = miners.RankWindowMiner(window=(100, 200))(x, y)
    assert len(short[0]) == 0


@settings(max_examples=25, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=1, max_size=12), seed=st.integers(0, 999))
def test_property_semihard_plus_hard_plus_easy_is_all(labels, seed):
    y = torch.tensor(labels)
    x = torch.randn(len(y), 2, dtype=F64, generator=torch.Generator().manual_seed(seed))
    sets = {
        kind: as_set(miners.TripletMarginMiner(0.4, kind)(x, y))
        for kind in ("hard", "semihard", "easy")
    }
    everything = as_set(miners.AllTripletsMiner()(x, y))
    assert sets["hard"] | sets["semihard"] | sets["easy"] == everything
    assert sum(len(s) for s in sets.values()) == len(everything)


@pytest.mark.parametrize(
    "miner",
    [
        miners.BatchHardMiner(),
        miners.TripletMarginMiner(),
        miners.DistanceWeightedMiner(),
        miners.RankWindowMiner(window=(1, 3)),
        miners.AllPairsMiner(),
    ],
    ids=lambda m: type(m).__name__,
)
@pytest.mark.parametrize("labels", [[0] * 6, list(range(6))], ids=["one_class", "singletons"])
def test_miners_return_nothing_when_no_triplet_exists(miner, labels):
    x, _ = batch(n=6)
    tuples = miner(x, torch.tensor(labels))
    if isinstance(miner, miners.AllPairsMiner):
        tuples = tuples[:2] if labels == list(range(6)) else tuples[2:]
    assert all(len(t) == 0 for t in tuples)


def test_miners_refuse_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        miners.BatchHardMiner()(torch.randn(4), torch.arange(4))
    with pytest.raises(ValueError, match="type_of_triplets"):
        miners.TripletMarginMiner(type_of_triplets="medium")
    with pytest.raises(ValueError, match="margin"):
        miners.TripletMarginMiner(margin=-1)
    with pytest.raises(ValueError, match="NaN"):
        miners.BatchHardMiner()(torch.full((4, 2), math.nan), torch.arange(4))
