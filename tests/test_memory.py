"""Cross-batch memory: the queue, the loss against [batch; memory] checked against references
that concatenate the stored embeddings by hand (and a loop over pairs), warm-up, stale
copies never paired, checkpoint round trip, and 2 real processes (gloo) where the memory
is identical on every rank and training equals one process on the concatenated batch."""

from __future__ import annotations

import copy

import pytest
import torch
from distributed_harness import run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepmetric import losses, miners
from deepmetric.distributed import DistributedLoss
from deepmetric.memory import CrossBatchMemory, CrossBatchMemoryLoss

DIM = 4


@settings(max_examples=40, deadline=None)
@given(
    memory_size=st.integers(1, 9), batch_sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6)
)
def test_queue_keeps_the_last_rows_oldest_first(memory_size, batch_sizes):
    memory = CrossBatchMemory(memory_size, 2)
    seen_rows, seen_ids = [], []
    for size in batch_sizes:
        ids = torch.arange(len(seen_ids), len(seen_ids) + size)
        rows = torch.randn(size, 2)
        memory.enqueue(rows, ids % 3, ids)
        seen_rows.append(rows)
        seen_ids += ids.tolist()
        stored, labels, stored_ids = memory.contents()
        expected = torch.cat(seen_rows)[-memory_size:]
        assert torch.equal(stored, expected)
        assert stored_ids.tolist() == seen_ids[-memory_size:]
        assert labels.tolist() == [i % 3 for i in seen_ids[-memory_size:]]
        assert len(memory) == min(len(seen_ids), memory_size)


def _batches(steps, rows=6, seed=0):
    """Batches of (embeddings, labels, ids) that repeat items across steps (ids 0..9)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randperm(10, generator=generator)[:rows]
        labels = ids % 3  # an item keeps its class
        out.append((torch.randn(rows, DIM, dtype=torch.float64, generator=generator), labels, ids))
    return out


CASES = {
    "triplet": (lambda: losses.TripletMarginLoss(margin=0.5), None),
    "triplet_miner": (lambda: losses.TripletMarginLoss(margin=0.5), miners.TripletMarginMiner),
    "multi_similarity": (lambda: losses.MultiSimilarityLoss(), None),
    "contrastive": (lambda: losses.ContrastiveLoss(neg_margin=2.0), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_equals_the_batch_against_the_stored_rows_concatenated_by_hand(case):
    make_loss, make_miner = CASES[case]
    memory_size, warmup = 8, 2
    wrapped = CrossBatchMemoryLoss(
        make_loss(), memory_size, DIM, warmup, miner=None if make_miner is None else make_miner()
    ).double()
    plain, miner = make_loss(), None if make_miner is None else make_miner()
    stored = []  # (embeddings, labels, ids) enqueued after the warm-up, by hand
    for step, (x, labels, ids) in enumerate(_batches(6)):
        x = x.requires_grad_()
        value = wrapped(x, labels, ids=ids)
        (grad,) = torch.autograd.grad(value, x)
        ref = x.detach().clone().requires_grad_()
        if step < warmup:
            tuples = None if miner is None else miner(ref, labels, query_ids=ids)
            expected = plain(ref, labels, tuples, query_ids=ids)
            assert len(wrapped.memory) == 0
        else:
            old = [torch.cat(parts)[-memory_size:] for parts in zip(*stored, strict=True)] or [
                x[:0].detach(),
                labels[:0],
                ids[:0],
            ]
            refs = torch.cat([ref, old[0]])
            ref_labels, ref_ids = torch.cat([labels, old[1]]), torch.cat([ids, old[2]])
            kwargs = {"ref_emb": refs, "ref_labels": ref_labels}
            tuples = None
            if miner is not None:
                tuples = miner(ref, labels, **kwargs, query_ids=ids, ref_ids=ref_ids)
            expected = plain(ref, labels, tuples, **kwargs, query_ids=ids, ref_ids=ref_ids)
            stored.append((x.detach(), labels, ids))
        (expected_grad,) = torch.autograd.grad(expected, ref)
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert len(wrapped.memory) == memory_size


def test_stale_copies_are_never_paired_loop_reference():
    """Contrastive "sum" against a loop over (anchor, reference) pairs of distinct items.
    The memory stores float64 here (`.double()`; float32 by default)."""
    pos_margin, neg_margin = 0.3, 2.0
    make = lambda: losses.ContrastiveLoss(pos_margin, neg_margin, reduction="sum")  # noqa: E731
    wrapped = CrossBatchMemoryLoss(make(), memory_size=9, embedding_dim=DIM).double()
    history = []
    for x, labels, ids in _batches(5):
        value = wrapped(x, labels, ids=ids)
        rows = [(x[j], labels[j], ids[j]) for j in range(len(x))]
        rows += history[-9:]
        expected = 0.0
        for i in range(len(x)):
            for row, label, item in rows:
                if item == ids[i]:
                    continue  # the item itself, fresh or stale
                d = float((x[i] - row).norm())
                expected += max(d - pos_margin, 0) if label == labels[i] else max(neg_margin - d, 0)
        history += [(x[j], labels[j], ids[j]) for j in range(len(x))]
        assert float(value) == pytest.approx(expected, rel=1e-12)


def test_without_ids_every_row_is_a_new_item():
    wrapped = CrossBatchMemoryLoss(losses.TripletMarginLoss(), 20, DIM).double()
    x, labels, _ = _batches(1)[0]
    wrapped(x, labels)
    value = wrapped(x, labels)  # the same rows again: their first copies are other items
    refs = torch.cat([x, x])
    ref_ids = torch.arange(12)
    expected = losses.TripletMarginLoss()(
        x,
        labels,
        ref_emb=refs,
        ref_labels=torch.cat([labels, labels]),
        query_ids=torch.arange(6, 12),
        ref_ids=torch.cat([ref_ids[6:], ref_ids[:6]]),
    )
    torch.testing.assert_close(value, expected)


def test_checkpoint_round_trip_continues_exactly():
    batches = _batches(6)
    straight = CrossBatchMemoryLoss(losses.MultiSimilarityLoss(), 7, DIM, warmup_steps=1)
    values = [float(straight(x, y)) for x, y, _ in batches]
    first = CrossBatchMemoryLoss(losses.MultiSimilarityLoss(), 7, DIM, warmup_steps=1)
    resumed_values = [float(first(x, y)) for x, y, _ in batches[:3]]
    state = copy.deepcopy(first.state_dict())
    second = CrossBatchMemoryLoss(losses.MultiSimilarityLoss(), 7, DIM, warmup_steps=1)
    second.load_state_dict(state)
    resumed_values += [float(second(x, y)) for x, y, _ in batches[3:]]
    assert resumed_values == values
    assert set(state) >= {"memory.embeddings", "memory.ids", "memory.steps", "memory.issued"}


def test_clear_errors():
    with pytest.raises(ValueError, match="memory_size must be an integer >= 1"):
        CrossBatchMemory(0, 4)
    with pytest.raises(ValueError, match="warmup_steps"):
        CrossBatchMemory(4, 4, warmup_steps=-1)
    with pytest.raises(ValueError, match="class vectors"):
        CrossBatchMemoryLoss(losses.NormalizedSoftmaxLoss(3, DIM), 4, DIM)
    wrapped = CrossBatchMemoryLoss(losses.TripletMarginLoss(), 4, DIM)
    x, labels, _ = _batches(1)[0]
    with pytest.raises(ValueError, match="miner=..."):
        wrapped(x, labels, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        wrapped.memory.enqueue(torch.zeros(2, 3), *torch.zeros(2, 2, dtype=torch.long))
    memory = CrossBatchMemory(4, 4)
    with pytest.raises(ValueError, match="memory_size"):
        memory.memory_size = float("nan")


SIZES = [4, 2]


def _distributed_case(rank, mode, with_ids):
    """Memory state and (loss, parameter) errors against one process on the whole batch."""
    torch.manual_seed(0)
    model = nn.Linear(DIM, DIM).double()
    reference_model = copy.deepcopy(model)
    make = lambda: CrossBatchMemoryLoss(losses.TripletMarginLoss(0.5), 9, DIM, 1)  # noqa: E731
    inner, reference = make().double(), make().double()
    wrapped = DistributedLoss(inner, mode)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_opt = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    rows = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))
    errors = []
    for x, labels, ids in _batches(5, rows=sum(SIZES), seed=3):
        opt.zero_grad()
        value = wrapped(ddp(x[rows]), labels[rows], ids=ids[rows] if with_ids else None)
        value.backward()
        opt.step()
        reference_opt.zero_grad()
        expected = reference(reference_model(x), labels, ids=ids if with_ids else None)
        expected.backward()
        reference_opt.step()
        errors.append(float((value - expected).abs() / expected.abs().clamp_min(1e-300)))
    for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
        errors.append(float((p - q).abs().max() / q.abs().max()))
    return errors, inner.memory.state_dict(), reference.memory.state_dict()


DISTRIBUTED_CASES = [(m, i) for m in ("replicated", "local_anchor") for i in (True, False)]


def _distributed_worker(rank, world):
    return [_distributed_case(rank, mode, with_ids) for mode, with_ids in DISTRIBUTED_CASES]


def test_memory_under_two_processes_is_identical_and_exact():
    results = run_ranks(_distributed_worker, 2, timeout=300)
    for rank, cases in enumerate(results):
        for case, (errors, state, reference_state) in zip(DISTRIBUTED_CASES, cases, strict=True):
            assert max(errors) < 1e-10, (case, rank, errors)
            rank0_state = results[0][DISTRIBUTED_CASES.index(case)][1]
            for key, tensor in state.items():
                # the same rows, in the same order, on every rank and as in one process
                torch.testing.assert_close(tensor, reference_state[key], rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(tensor, rank0_state[key], rtol=0, atol=0)
