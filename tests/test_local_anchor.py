"""Pair exclusion by item ids and the local-anchor decomposition of the batch losses.

A loss that supports local-anchor mode is a sum of per-anchor terms divided by one count:
computing it for each part of a split of the anchors, against the whole batch as reference
set with ids (so that a row is never paired with itself), and dividing the summed `loss_sum`
by the summed `normaliser`, must give the full-batch loss and its gradient (float64).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from deepmetric import losses, miners
from deepmetric.distances import CosineSimilarity, EuclideanDistance

LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])  # uneven, one singleton (3)
SPLITS = {
    "halves": [range(0, 6), range(6, 12)],
    "uneven": [range(0, 1), range(1, 8), range(8, 12)],
    "interleaved": [range(0, 12, 3), range(1, 12, 3), range(2, 12, 3)],
}

SUPPORTED = {
    "triplet": lambda **k: losses.triplet_margin_loss(margin=0.5, **k),
    "triplet_nonzero": lambda **k: losses.triplet_margin_loss(
        margin=0.5, reduction="nonzero_mean", **k
    ),
    "triplet_sum": lambda **k: losses.triplet_margin_loss(margin=0.5, reduction="sum", **k),
    "triplet_smooth": lambda **k: losses.triplet_margin_loss(smooth_loss=True, **k),
    "triplet_swap": lambda **k: losses.triplet_margin_loss(margin=0.5, swap=True, **k),
    "triplet_cosine": lambda **k: losses.triplet_margin_loss(distance=CosineSimilarity(), **k),
    "multi_similarity": lambda **k: losses.multi_similarity_loss(**k),
    "circle": lambda **k: losses.circle_loss(**k),
    "ranked_list": lambda **k: losses.ranked_list_loss(**k),
    "margin": lambda **k: losses.margin_loss(**k),
    "margin_mean": lambda **k: losses.margin_loss(reduction="mean", **k),
    "ntxent": lambda **k: losses.ntxent_loss(temperature=0.5, **k),
    "supcon": lambda **k: losses.supcon_loss(temperature=0.5, **k),
    "npairs": lambda **k: losses.npairs_loss(l2_reg_weight=0.0, **k),
}


def _embeddings(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(LABELS), 5, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1)


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_sum_over_anchor_parts_equals_full_batch_loss(name, split):
    loss_fn = SUPPORTED[name]
    x = _embeddings().requires_grad_()
    full = loss_fn(embeddings=x, labels=LABELS)
    (grad_full,) = torch.autograd.grad(full, x)

    ids = torch.arange(len(LABELS)) * 7 + 3  # any integers, not row numbers
    sums, counts = [], []
    for part in SPLITS[split]:
        rows = torch.tensor(list(part))
        _, stats = loss_fn(
            embeddings=x[rows],
            labels=LABELS[rows],
            ref_emb=x,
            ref_labels=LABELS,
            query_ids=ids[rows],
            ref_ids=ids,
            return_stats=True,
        )
        sums.append(stats.loss_sum)
        counts.append(torch.as_tensor(stats.normaliser))
    combined = torch.stack(sums).sum()
    if not name.endswith("_sum"):  # "sum": the normaliser is 1 in every call, nothing to divide
        combined = combined / torch.stack(counts).sum().clamp_min(1)
    (grad_parts,) = torch.autograd.grad(combined, x)
    torch.testing.assert_close(combined, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_parts, grad_full, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_stats_loss_sum_over_normaliser_is_the_loss(name):
    x = _embeddings(1).requires_grad_()
    loss, stats = SUPPORTED[name](embeddings=x, labels=LABELS, return_stats=True)
    expected = stats.loss_sum / torch.as_tensor(stats.normaliser).clamp_min(1)
    torch.testing.assert_close(loss, expected.to(loss.dtype))
    assert stats.loss_sum.requires_grad


def _batch_loss_classes():
    return [
        cls
        for _, cls in inspect.getmembers(losses, inspect.isclass)
        if issubclass(cls, losses.MetricLoss) and cls is not losses.MetricLoss
    ]


@pytest.mark.parametrize("cls", _batch_loss_classes(), ids=lambda c: c.__name__)
def test_every_loss_says_whether_it_runs_local_anchor(cls):
    supported = cls.local_anchor_supported
    if isinstance(supported, property):
        return  # decided per instance (an extra term with its own count); checked below
    assert isinstance(supported, bool)
    if not supported:
        assert len(cls.local_anchor_reason) > 20


def test_instance_support_follows_the_extra_terms():
    assert losses.MarginLoss(nu=0.0).local_anchor_supported
    assert not losses.MarginLoss(nu=0.1).local_anchor_supported
    assert losses.NPairsLoss(l2_reg_weight=0.0).local_anchor_supported
    assert not losses.NPairsLoss().local_anchor_supported


EXCLUDING = {
    "contrastive": lambda **k: losses.contrastive_loss(neg_margin=1.5, **k),
    "lifted": lambda **k: losses.lifted_structure_loss(**k),
    "histogram": lambda **k: losses.histogram_loss(n_bins=10, **k),
    **SUPPORTED,
}


@pytest.mark.parametrize("name", sorted(EXCLUDING))
def test_ids_against_a_copy_of_the_batch_equal_the_batch_against_itself(name):
    x = _embeddings(2)
    ids = torch.arange(len(LABELS))
    own = EXCLUDING[name](embeddings=x, labels=LABELS)
    copy = EXCLUDING[name](
        embeddings=x,
        labels=LABELS,
        ref_emb=x.clone(),
        ref_labels=LABELS,
        query_ids=ids,
        ref_ids=ids,
    )
    torch.testing.assert_close(copy, own)


def test_stale_copies_in_a_memory_are_never_paired_with_their_item():
    """A memory holding two older copies of each item: the batch against [memory] with ids
    equals a reference that drops the same-item pairs by hand."""
    x = _embeddings(3)
    memory = torch.cat([_embeddings(4), _embeddings(5)])
    memory_labels = torch.cat([LABELS, LABELS])
    ids = torch.arange(len(LABELS))
    memory_ids = torch.cat([ids, ids])
    got = losses.supcon_loss(
        x, LABELS, ref_emb=memory, ref_labels=memory_labels, query_ids=ids, ref_ids=memory_ids
    )
    # By hand: per anchor, drop the two copies of itself from the reference set.
    sim = x @ memory.T / 0.1
    terms = []
    for i in range(len(LABELS)):
        keep = memory_ids != i
        positive = keep & (memory_labels == LABELS[i])
        if positive.any():
            log_prob = sim[i] - torch.logsumexp(sim[i][keep], 0)
            terms.append(-log_prob[positive].mean())
    torch.testing.assert_close(got, torch.stack(terms).mean())


def test_equal_ids_with_different_labels_are_refused():
    x = _embeddings()
    with pytest.raises(ValueError, match="same item but carry different labels"):
        losses.triplet_margin_loss(
            x,
            LABELS,
            ref_emb=x,
            ref_labels=LABELS.roll(1),
            query_ids=torch.arange(12),
            ref_ids=torch.arange(12),
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"query_ids": torch.arange(12)}, "ref_ids is missing"),
        ({"query_ids": torch.arange(12).float(), "ref_ids": torch.arange(12)}, "integers"),
        ({"query_ids": torch.arange(11), "ref_ids": torch.arange(12)}, "11 entries"),
    ],
)
def test_bad_ids_name_the_argument(kwargs, message):
    x = _embeddings()
    with pytest.raises((ValueError, TypeError), match=message):
        losses.supcon_loss(x, LABELS, ref_emb=x, ref_labels=LABELS, **kwargs)


def test_batch_structure_losses_refuse_ids():
    x = _embeddings()
    with pytest.raises(ValueError, match="query_ids / ref_ids are not supported"):
        losses.facility_location_loss(x, LABELS, query_ids=torch.arange(12))


MINERS = {
    "batch_hard": lambda: miners.BatchHardMiner(),
    "triplet_margin": lambda: miners.TripletMarginMiner(margin=0.5, type_of_triplets="all"),
    "pair_margin": lambda: miners.PairMarginMiner(pos_margin=0.2, neg_margin=1.2),
    "multi_similarity": lambda: miners.MultiSimilarityMiner(epsilon=0.3),
    "all_triplets": lambda: miners.AllTripletsMiner(),
    "all_pairs": lambda: miners.AllPairsMiner(),
}


@pytest.mark.parametrize("name", sorted(MINERS))
def test_miners_with_ids_against_a_copy_mine_as_against_the_batch(name):
    x = _embeddings(6)
    ids = torch.arange(len(LABELS))
    own = MINERS[name]()(x, LABELS)
    copy = MINERS[name]()(x, LABELS, x.clone(), LABELS, query_ids=ids, ref_ids=ids)
    assert len(own) == len(copy)
    for a, b in zip(own, copy, strict=True):
        assert torch.equal(a, b)


def test_local_anchor_module_forward_takes_ids():
    x = _embeddings(7)
    loss_fn = losses.TripletMarginLoss(margin=0.3, distance=EuclideanDistance())
    ids = torch.arange(12)
    loss_fn(x[:5], LABELS[:5], ref_emb=x, ref_labels=LABELS, query_ids=ids[:5], ref_ids=ids)
    assert loss_fn.stats.loss_sum is not None
    assert int(loss_fn.stats.normaliser) == int(loss_fn.stats.num_triplets)
