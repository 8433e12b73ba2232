"""Multi-hot label sets and explicit relevance in every pair, triplet and structured loss and
every miner, against references written from the formulas with loops over pairs (float64,
values and gradients): a pair is positive when the two rows share a label (or when its
relevance is > 0), negative when they share none (relevance 0), and never the row itself."""

from __future__ import annotations

import pytest
import reference_structured as ref
import torch
from reference_structured import assert_same

from deepmetric import losses, miners
from deepmetric.distances import CosineSimilarity, EuclideanDistance


def label_sets(seed: int, n: int = 10, num_labels: int = 4) -> torch.Tensor:
    """(n, L) bool: random sets of 0 to 2 labels, with one empty row and one full row."""
    generator = torch.Generator().manual_seed(seed)
    hot = torch.rand(n, num_labels, generator=generator) < 0.35
    hot[0] = False  # a row with no label: no positive, every other row a negative
    hot[1] = True  # a row with every label: every labelled row is a positive
    return hot


def sets_from_labels(hot, ref_hot=None):
    """(positive pairs, negative pairs): shared label or not, never a row with itself."""
    same_set = ref_hot is None
    ref_hot = hot if same_set else ref_hot
    pos, neg = set(), set()
    for i in range(len(hot)):
        for j in range(len(ref_hot)):
            if same_set and i == j:
                continue
            shared = any(bool(a) and bool(b) for a, b in zip(hot[i], ref_hot[j], strict=True))
            (pos if shared else neg).add((i, j))
    return pos, neg


def sets_from_relevance(relevance, same_set=True):
    pos, neg = set(), set()
    for i in range(relevance.shape[0]):
        for j in range(relevance.shape[1]):
            if same_set and i == j:
                continue
            (pos if float(relevance[i, j]) > 0 else neg).add((i, j))
    return pos, neg


def embeddings(seed: int, n: int = 10, dim: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(50 + seed)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64)


def relevance_matrix(seed: int, n: int = 10) -> torch.Tensor:
    generator = torch.Generator().manual_seed(70 + seed)
    grades = torch.randint(0, 4, (n, n), generator=generator).double()
    return grades * (torch.rand(n, n, generator=generator) < 0.4)


# Reference forms of the pair and triplet losses over (positive, negative) pair sets.


def contrastive_ref(d, pos, neg, pos_margin, neg_margin):
    pos_terms = [torch.relu(d[i, j] - pos_margin) for i, j in sorted(pos)]
    neg_terms = [torch.relu(neg_margin - d[i, j]) for i, j in sorted(neg)]
    total = d.sum() * 0
    if pos_terms:
        total = total + torch.stack(pos_terms).mean()
    if neg_terms:
        total = total + torch.stack(neg_terms).mean()
    return total


def triplet_ref(d, pos, neg, margin, smooth=False):
    terms = []
    for a, p in sorted(pos):
        for b, n in sorted(neg):
            if a != b:
                continue
            v = d[a, p] - d[a, n] + margin
            terms.append(torch.nn.functional.softplus(v) if smooth else torch.relu(v))
    return torch.stack(terms).mean() if terms else d.sum() * 0


def _pair_reference(name, x, pos, neg):
    n = len(x)
    if name == "contrastive":
        return contrastive_ref(ref.as_matrix(EuclideanDistance(), x), pos, neg, 0.1, 1.5)
    if name == "triplet":
        return triplet_ref(ref.as_matrix(EuclideanDistance(), x), pos, neg, 0.8)
    if name == "triplet_smooth":
        return triplet_ref(ref.as_matrix(EuclideanDistance(), x), pos, neg, 0.3, smooth=True)
    sim = ref.as_matrix(CosineSimilarity(), x)
    dis = ref.as_matrix(EuclideanDistance(), x)
    if name == "lifted":
        return ref.lifted(dis, pos, neg, 1.2, 0.0, True, same_set=True)
    if name == "multi_similarity":
        return ref.multi_similarity(sim, pos, neg, 2.0, 10.0, 0.5, n)
    if name == "circle":
        return ref.circle(sim, pos, neg, 0.4, 10.0, n)
    if name == "ranked_list":
        return ref.ranked_list(dis, pos, neg, 0.4, 1.2, 10.0, 0.0, 0.5, n)
    if name == "margin":
        return ref.margin(dis, pos, neg, 0.2, lambda a: 1.2, 0.0, "nonzero_mean")
    if name == "ntxent":
        return ref.ntxent(sim, pos, neg, 0.5)
    if name == "supcon":
        return ref.supcon(sim, pos, neg, 0.5, n)
    if name == "histogram":
        return ref.histogram(sim, pos, neg, 10, -1.0, 1.0)
    raise KeyError(name)


LOSSES = {
    "contrastive": lambda x, **k: losses.contrastive_loss(x, pos_margin=0.1, neg_margin=1.5, **k),
    "triplet": lambda x, **k: losses.triplet_margin_loss(x, margin=0.8, **k),
    "triplet_smooth": lambda x, **k: losses.triplet_margin_loss(
        x, margin=0.3, smooth_loss=True, **k
    ),
    "lifted": lambda x, **k: losses.lifted_structure_loss(x, neg_margin=1.2, **k),
    "multi_similarity": lambda x, **k: losses.multi_similarity_loss(x, beta=10.0, **k),
    "circle": lambda x, **k: losses.circle_loss(x, gamma=10.0, **k),
    "ranked_list": lambda x, **k: losses.ranked_list_loss(x, **k),
    "margin": lambda x, **k: losses.margin_loss(x, **k),
    "ntxent": lambda x, **k: losses.ntxent_loss(x, temperature=0.5, **k),
    "supcon": lambda x, **k: losses.supcon_loss(x, temperature=0.5, **k),
    "histogram": lambda x, **k: losses.histogram_loss(x, n_bins=10, **k),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_multi_hot_labels_match_the_reference(name, seed):
    hot = label_sets(seed)
    pos, neg = sets_from_labels(hot)
    assert_same(
        lambda x: LOSSES[name](x, labels=hot),
        lambda x: _pair_reference(name, x, pos, neg),
        embeddings(seed),
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_relevance_matrix_matches_the_reference(name, seed):
    relevance = relevance_matrix(seed)
    pos, neg = sets_from_relevance(relevance)
    assert_same(
        lambda x: LOSSES[name](x, labels=None, relevance=relevance),
        lambda x: _pair_reference(name, x, pos, neg),
        embeddings(seed),
    )


def test_integer_multi_hot_equals_bool_and_one_hot_equals_class_ids():
    x = embeddings(3)
    hot = label_sets(3)
    for name in ("triplet", "supcon", "contrastive"):
        as_bool = LOSSES[name](x, labels=hot)
        as_uint8 = LOSSES[name](x, labels=hot.to(torch.uint8))
        torch.testing.assert_close(as_bool, as_uint8)
    classes = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    one_hot = torch.nn.functional.one_hot(classes)
    for name in sorted(LOSSES):
        torch.testing.assert_close(LOSSES[name](x, labels=one_hot), LOSSES[name](x, labels=classes))


def test_relevance_equal_to_the_label_mask_equals_the_labels():
    x = embeddings(4)
    classes = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    relevance = classes.unsqueeze(1) == classes.unsqueeze(0)
    for name in sorted(LOSSES):
        got = LOSSES[name](x, labels=None, relevance=relevance)
        torch.testing.assert_close(got, LOSSES[name](x, labels=classes))


def test_multi_hot_against_a_reference_set():
    x, r = embeddings(5), embeddings(6, n=7)
    hot, ref_hot = label_sets(5), label_sets(6, n=7)
    pos, neg = sets_from_labels(hot, ref_hot)
    assert_same(
        lambda x, r: losses.triplet_margin_loss(x, hot, ref_emb=r, ref_labels=ref_hot, margin=0.8),
        lambda x, r: triplet_ref(ref.as_matrix(EuclideanDistance(), x, r), pos, neg, 0.8),
        x,
        r,
    )


def weighted_supcon_ref(sim, weights, others, temperature):
    """Multi-label SupCon: -sum_p w_ip log softmax_ip / sum_p w_ip over anchors with a
    positive; `others[i]` the pairs of anchor i, `weights[i][j]` > 0 on its positives."""
    total, anchors = sim.sum() * 0, 0
    for i in range(sim.shape[0]):
        positives = [(j, w) for j, w in weights[i].items() if w > 0]
        if not positives:
            continue
        anchors += 1
        denominator = torch.logsumexp(torch.stack([sim[i, k] / temperature for k in others[i]]), 0)
        weighted = sum(w * (sim[i, j] / temperature - denominator) for j, w in positives)
        total = total - weighted / sum(w for _, w in positives)
    return total / max(anchors, 1)


def test_supcon_jaccard_weights_match_the_reference():
    hot = label_sets(7)
    n = len(hot)
    weights = {}
    for i in range(n):
        weights[i] = {}
        for j in range(n):
            inter = int((hot[i] & hot[j]).sum())
            union = int((hot[i] | hot[j]).sum())
            weights[i][j] = inter / union if i != j and inter else 0.0
    others = {i: [j for j in range(n) if j != i] for i in range(n)}
    assert_same(
        lambda x: losses.supcon_loss(x, hot, temperature=0.5, weight_positives=True),
        lambda x: weighted_supcon_ref(ref.as_matrix(CosineSimilarity(), x), weights, others, 0.5),
        embeddings(7),
    )


def test_supcon_relevance_weights_match_the_reference():
    relevance = relevance_matrix(8)
    n = len(relevance)
    weights = {
        i: {j: float(relevance[i, j]) if i != j else 0.0 for j in range(n)} for i in range(n)
    }
    others = {i: [j for j in range(n) if j != i] for i in range(n)}
    assert_same(
        lambda x: losses.supcon_loss(
            x, None, relevance=relevance, temperature=0.5, weight_positives=True
        ),
        lambda x: weighted_supcon_ref(ref.as_matrix(CosineSimilarity(), x), weights, others, 0.5),
        embeddings(8),
    )


MINERS = {
    "batch_hard": miners.BatchHardMiner,
    "all_triplets": miners.AllTripletsMiner,
    "semihard": lambda: miners.TripletMarginMiner(margin=1.0, type_of_triplets="semihard"),
    "pair_margin": lambda: miners.PairMarginMiner(pos_margin=0.5, neg_margin=2.0),
    "multi_similarity": lambda: miners.MultiSimilarityMiner(epsilon=0.5),
    "hardnet": miners.HardNetMiner,
    "distance_weighted": lambda: miners.DistanceWeightedMiner(cutoff=0.1, nonzero_loss_cutoff=2.0),
    "rank_window": lambda: miners.RankWindowMiner(window=(1, 3)),
}


@pytest.mark.parametrize("name", sorted(MINERS))
def test_miners_return_only_pairs_of_the_label_sets(name):
    hot = label_sets(9)
    pos, neg = sets_from_labels(hot)
    tuples = MINERS[name]()(embeddings(9), hot)
    if len(tuples) == 3:
        a, p, n = (t.tolist() for t in tuples)
        mined_pos, mined_neg = set(zip(a, p, strict=True)), set(zip(a, n, strict=True))
    else:
        a1, p, a2, n = (t.tolist() for t in tuples)
        mined_pos, mined_neg = set(zip(a1, p, strict=True)), set(zip(a2, n, strict=True))
    assert mined_pos <= pos
    assert mined_neg <= neg
    assert len(tuples[0]) > 0


def test_all_triplets_miner_lists_every_multi_label_triplet():
    hot = label_sets(10)
    pos, neg = sets_from_labels(hot)
    expected = {(a, p, n) for a, p in pos for b, n in neg if a == b}
    got = miners.AllTripletsMiner()(embeddings(10), hot)
    assert set(zip(*(t.tolist() for t in got), strict=True)) == expected


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.rand(10, 3), "multi-hot"),
        (torch.randint(0, 3, (10, 3)), "0 or 1"),
        (torch.ones(9, 3, dtype=torch.bool), "9 rows"),
    ],
)
def test_bad_label_sets_name_the_argument(labels, message):
    with pytest.raises(ValueError, match=message):
        losses.triplet_margin_loss(embeddings(0), labels)


@pytest.mark.parametrize(
    "relevance, error, message",
    [
        (torch.ones(10, 9), ValueError, r"\(10, 10\)"),
        (-torch.ones(10, 10), ValueError, ">= 0"),
        (torch.full((10, 10), float("nan")), ValueError, "NaN"),
        (torch.ones(10), TypeError, "2-D"),
    ],
)
def test_bad_relevance_names_the_argument(relevance, error, message):
    with pytest.raises(error, match=message):
        losses.supcon_loss(embeddings(0), None, relevance=relevance)


def test_class_losses_refuse_label_sets():
    with pytest.raises(ValueError, match="one class id per row"):
        losses.coupled_clusters_loss(embeddings(0), label_sets(0))
    with pytest.raises(ValueError, match="class id per row"):
        losses.margin_loss(embeddings(0), label_sets(0), beta=torch.ones(4))


def test_label_sets_with_ids_of_a_stale_copy():
    x = embeddings(11)
    hot = label_sets(11)
    ids = torch.arange(len(x))
    own = losses.triplet_margin_loss(x, hot, margin=0.5)
    copy = losses.triplet_margin_loss(
        x, hot, ref_emb=x.clone(), ref_labels=hot, query_ids=ids, ref_ids=ids, margin=0.5
    )
    torch.testing.assert_close(copy, own)
