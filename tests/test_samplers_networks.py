from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepmetric.losses import ContrastiveLoss, TripletMarginLoss
from deepmetric.networks import SiameseNetwork, TripletNetwork
from deepmetric.samplers import PKBatchSampler


def check_batches(labels, batches, p, k):
    for batch in batches:
        assert len(batch) == p * k
        groups = labels[np.asarray(batch)].reshape(p, k)
        assert (groups == groups[:, :1]).all(), "each block of K items shares one class"
        assert len(set(groups[:, 0].tolist())) == p, "P distinct classes per batch"


def test_pk_batches_have_p_distinct_classes_of_k_items():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 37, 2000)
    sampler = PKBatchSampler(labels, classes_per_batch=8, samples_per_class=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == -(-2000 // 32)
    check_batches(labels, batches, 8, 4)
    for batch in batches:
        assert len(set(batch)) == len(batch), "no item twice in a batch"


def test_classes_are_covered_evenly_and_items_cycled():
    labels = np.repeat(np.arange(10), 12)
    sampler = PKBatchSampler(labels, classes_per_batch=4, samples_per_class=3, num_batches=50)
    batches = list(sampler)
    check_batches(labels, batches, 4, 3)
    visits = Counter(labels[np.asarray(batches)[:, ::3]].ravel().tolist())
    assert max(visits.values()) - min(visits.values()) <= 1
    items = Counter(np.asarray(batches).ravel().tolist())
    assert max(items.values()) - min(items.values()) <= 1


def test_epochs_are_reproducible_and_differ():
    labels = np.repeat(np.arange(6), 5)
    a = PKBatchSampler(labels, 3, 2, seed=7)
    b = PKBatchSampler(labels, 3, 2, seed=7)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    assert list(a) != first_a  # the next epoch is another draw
    b.set_epoch(0)
    assert list(b) == first_a


def test_small_classes_are_excluded_or_repeated():
    labels = np.array([0] * 5 + [1] * 5 + [2] * 1 + [3] * 5)
    sampler = PKBatchSampler(labels, 2, 3)
    assert sampler.excluded_classes.tolist() == [2]
    assert all(labels[i] != 2 for batch in sampler for i in batch)
    repeated = PKBatchSampler(labels, 4, 3, replacement=True, num_batches=4)
    check_batches(labels, list(repeated), 4, 3)
    with pytest.raises(ValueError, match="replacement=True"):
        PKBatchSampler(labels, 4, 3)


def test_impossible_requests_raise_clear_errors():
    with pytest.raises(ValueError, match="only 3 classes"):
        PKBatchSampler([0, 0, 1, 1, 2, 2], 4, 2)
    with pytest.raises(ValueError, match=">= 1"):
        PKBatchSampler([0, 0], 0, 2)
    with pytest.raises(ValueError, match="non-empty"):
        PKBatchSampler([], 1, 1)


def test_string_labels_and_dataloader_integration():
    labels = np.array(["cat", "dog", "eel"] * 4)
    x = torch.arange(12.0).unsqueeze(1)
    loader = DataLoader(TensorDataset(x), batch_sampler=PKBatchSampler(labels, 2, 2))
    for (rows,) in loader:
        assert rows.shape == (4, 1)


def test_millions_of_items_in_seconds():
    labels = np.random.default_rng(1).integers(0, 50_000, 1_000_000)
    sampler = PKBatchSampler(labels, 32, 4, num_batches=2000)
    batches = list(sampler)
    check_batches(labels, batches[:50], 32, 4)


def test_siamese_and_triplet_networks_share_one_encoder():
    torch.manual_seed(0)
    encoder = nn.Linear(4, 3)
    a, p, n = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    embeddings, indices = TripletNetwork(encoder)(a, p, n)
    torch.testing.assert_close(embeddings[5:10], encoder(p))
    loss = TripletMarginLoss(margin=0.5)(embeddings, indices_tuple=indices)
    d = torch.nn.functional.pairwise_distance
    expected = torch.relu(d(encoder(a), encoder(p), eps=0) - d(encoder(a), encoder(n), eps=0) + 0.5)
    torch.testing.assert_close(loss, expected.mean())
    same = torch.tensor([1, 0, 1, 1, 0])
    embeddings, indices = SiameseNetwork(encoder)(a, p, same)
    loss = ContrastiveLoss(neg_margin=2.0)(embeddings, indices_tuple=indices)
    distance = d(encoder(a), encoder(p), eps=0)
    expected = distance[same == 1].mean() + torch.relu(2.0 - distance[same == 0]).mean()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="equal lengths"):
        TripletNetwork(encoder)(a, p, n[:3])
