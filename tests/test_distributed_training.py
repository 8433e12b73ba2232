"""The trainer's distributed pieces on 2 real processes (gloo): a model with batch norm under
DDP with `SyncBatchNormCPU` trains exactly as one process on the concatenated batch, the
evaluation is sharded and gathered in order, and checkpoints hold the plain modules' state."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_harness import run_ranks
from torch import nn

from deepmetric import losses
from deepmetric.data import ArrayDataset
from deepmetric.inference import embed
from deepmetric.training.distributed_run import (
    SyncBatchNormCPU,
    TrainingModule,
    any_rank,
    embed_sharded,
    is_main,
    metrics_log,
    restore_rng_states,
    rng_states,
    wrap_for_training,
)
from deepmetric.training.errors import CheckpointError
from deepmetric.training.run_folder import RunFolder

SIZES, LABELS = [5, 3], [0, 0, 1, 1, 4, 2, 3, 3]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=0.3), nn.ReLU(), nn.Linear(8, 4)
    ).double()


def relative_error(value, reference) -> float:
    value, reference = value.detach(), reference.detach()
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-300))


def _worker(rank, world):
    labels = torch.tensor(LABELS)
    rows = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))
    results = {}
    for name, make_loss in {
        "triplet": lambda: losses.TripletMarginLoss(margin=0.3),
        "proxy_anchor": lambda: losses.ProxyAnchorLoss(5, 4),
    }.items():
        model, reference = _model(), _model()
        torch.manual_seed(1)
        loss_fn = make_loss().double()
        reference_loss = copy.deepcopy(loss_fn)
        parameters = [*model.parameters(), *loss_fn.parameters()]
        reference_parameters = [*reference.parameters(), *reference_loss.parameters()]
        opt = torch.optim.SGD(parameters, lr=0.1, momentum=0.9)
        reference_opt = torch.optim.SGD(reference_parameters, lr=0.1, momentum=0.9)
        run_model, run_loss, run_miner = wrap_for_training(model, loss_fn, None)
        errors = []
        for step in range(3):
            x = torch.randn(
                8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(step)
            )
            opt.zero_grad()
            value = run_loss(run_model(x[rows]), labels[rows])
            value.backward()
            opt.step()
            reference_opt.zero_grad()
            expected = reference_loss(reference(x), labels)
            expected.backward()
            reference_opt.step()
            errors.append(relative_error(value.detach(), expected.detach()))
        state, reference_state = run_model.state_dict(), reference.state_dict()
        errors += [relative_error(state[k].double(), reference_state[k].double()) for k in state]
        pairs = zip(parameters, reference_parameters, strict=True)
        errors += [relative_error(p, q) for p, q in pairs]
        results[name] = (
            max(errors),
            run_miner,
            list(run_loss.state_dict()) == list(reference_loss.state_dict()),
        )
    helpers = _helpers(rank)
    model = _model().eval()
    dataset = ArrayDataset(torch.randn(11, 6, generator=torch.Generator().manual_seed(9)), [0] * 11)
    # one row per forward pass, so rounding does not depend on how rows are grouped
    sharded = embed_sharded(model.float(), dataset, batch_size=1)
    return results, sharded, embed(model, dataset, batch_size=1), helpers


def _helpers(rank):
    """The ranks' agreement on a flag, their random states in the checkpoint, the log."""
    torch.manual_seed(100 + rank)
    states = rng_states()  # every rank's, in rank order
    expected = torch.rand(3)
    torch.manual_seed(0)
    restore_rng_states(states)  # each rank gets its own stream back
    restored = torch.equal(torch.rand(3), expected)
    if rank == 1:  # not the writer: its log writes nothing, not even the folder
        metrics_log(RunFolder("/nonexistent/run")).write({"event": "train", "step": 1})
    return any_rank(rank == 1), any_rank(False), len(states), restored, is_main()


def test_ddp_with_sync_batch_norm_equals_one_process():
    for rank, (results, sharded, whole, helpers) in enumerate(run_ranks(_worker, 2, timeout=240)):
        for name, (error, miner, same_keys) in results.items():
            assert error < 1e-10, (rank, name, error)
            assert miner is None  # the miner runs inside the distributed loss
            assert same_keys  # checkpoints hold the plain loss's state
        np.testing.assert_array_equal(sharded, whole)
        assert helpers == (True, False, 2, True, rank == 0), (rank, helpers)
    assert not Path("/nonexistent/run").exists()


def test_single_process_is_unchanged():
    model, loss_fn = _model(), losses.ContrastiveLoss()
    assert wrap_for_training(model, loss_fn, None) == (model, loss_fn, None)
    dataset = ArrayDataset(torch.randn(5, 6), [0] * 5)
    np.testing.assert_array_equal(embed_sharded(model.float(), dataset), embed(model, dataset))


def test_sync_batch_norm_keeps_the_state_and_is_plain_in_one_process():
    model = _model()
    x = torch.randn(7, 6, dtype=torch.float64)
    expected = copy.deepcopy(model)(x)
    converted = SyncBatchNormCPU.convert(copy.deepcopy(model))
    assert isinstance(converted[1], SyncBatchNormCPU)
    assert list(converted.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)


def test_training_module_saves_the_plain_state():
    model = _model()
    wrapped = TrainingModule(nn.Identity(), model)
    assert list(wrapped.state_dict()) == list(model.state_dict())
    wrapped.load_state_dict(_model().state_dict())
    assert wrapped.module is model


def test_resuming_with_another_number_of_processes_is_refused():
    states = [rng_states(), rng_states()]  # what a 2-process run writes
    with pytest.raises(CheckpointError, match="--nproc-per-node=2"):
        restore_rng_states(states)
