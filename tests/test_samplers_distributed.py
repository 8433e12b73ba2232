"""DistributedPKBatchSampler: each rank's share of the global P x K batches, and the checked
hyper-parameters of the P x K samplers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmetric.samplers import DistributedPKBatchSampler, PKBatchSampler


def rank_batches(labels, p, k, world, **kwargs):
    return [
        list(DistributedPKBatchSampler(labels, p, k, num_replicas=world, rank=rank, **kwargs))
        for rank in range(world)
    ]


@settings(max_examples=30, deadline=None)
@given(
    num_classes=st.integers(2, 12),
    p=st.integers(1, 12),
    k=st.integers(1, 4),
    world=st.integers(1, 5),
    seed=st.integers(0, 10),
)
def test_ranks_split_the_global_batches_by_class(num_classes, p, k, world, seed):
    p, world = min(p, num_classes), min(world, p, num_classes)
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), k + 1))
    whole = list(PKBatchSampler(labels, p, k, seed=seed))
    per_rank = rank_batches(labels, p, k, world, seed=seed)
    share, extra = divmod(p, world)
    for batch, parts in zip(whole, zip(*per_rank, strict=True), strict=True):
        # the ranks' batches, concatenated in rank order, are the single-process batch
        assert [i for part in parts for i in part] == batch
        class_sets = []
        for rank, part in enumerate(parts):
            assert len(part) == (share + (rank < extra)) * k
            groups = labels[np.asarray(part)].reshape(-1, k)
            assert (groups == groups[:, :1]).all(), "K items of one class per block"
            class_sets.append(set(groups[:, 0].tolist()))
        # no class is split across ranks
        assert sum(len(c) for c in class_sets) == len(set().union(*class_sets)) == p


def test_epochs_resume_like_the_single_process_sampler():
    labels = np.repeat(np.arange(9), 4)
    sampler = DistributedPKBatchSampler(labels, 4, 2, num_replicas=2, rank=1, seed=5)
    first, second = list(sampler), list(sampler)
    assert first != second
    sampler.set_epoch(1)
    assert list(sampler) == second
    assert len(sampler) == len(PKBatchSampler(labels, 4, 2, seed=5))


def test_defaults_to_one_process_without_torch_distributed():
    labels = np.repeat(np.arange(5), 3)
    sampler = DistributedPKBatchSampler(labels, 3, 2, seed=1)
    assert (sampler.rank, sampler.num_replicas) == (0, 1)
    assert list(sampler) == list(PKBatchSampler(labels, 3, 2, seed=1))


def test_clear_errors():
    labels = np.repeat(np.arange(5), 3)
    with pytest.raises(ValueError, match="at least one class"):
        DistributedPKBatchSampler(labels, 2, 2, num_replicas=3, rank=0)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\)"):
        DistributedPKBatchSampler(labels, 2, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas must be an integer >= 1"):
        DistributedPKBatchSampler(labels, 2, 2, num_replicas=0, rank=0)


@pytest.mark.parametrize(
    ("name", "value"),
    [("classes_per_batch", 0), ("samples_per_class", 2.5), ("seed", -1), ("num_batches", 0)],
)
def test_hyper_parameters_are_checked(name, value):
    labels = np.repeat(np.arange(5), 3)
    arguments = {"classes_per_batch": 2, "samples_per_class": 2, name: value}
    with pytest.raises(ValueError, match=name):
        PKBatchSampler(labels, **arguments)
    if name != "num_batches":
        sampler = PKBatchSampler(labels, 2, 2)
        with pytest.raises(ValueError, match=name):
            setattr(sampler, name, value)
