"""deepmetric.distributed on 2 real processes (gloo on 127.0.0.1): the loss on every rank and
the model's parameters after 1 and 3 optimiser steps under DistributedDataParallel equal
those of one process on the concatenated batch (float64, 1e-10 relative), for each loss
family and each mode it supports, with even and uneven label layouts."""

from __future__ import annotations

import copy

import pytest
import torch
from distributed_harness import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepmetric import losses, miners
from deepmetric.distributed import (
    DistributedLoss,
    all_gather_rows,
    all_gather_with_grad,
    average_gradients,
    check_mode,
)

NUM_CLASSES, DIM_IN, DIM = 5, 6, 4

FAMILIES = {
    "contrastive": (lambda: losses.ContrastiveLoss(pos_margin=0.1, neg_margin=1.5), None),
    "all_triplets": (lambda: losses.TripletMarginLoss(margin=0.5), None),
    # a "sum" reduction: each rank's normaliser is 1, and so is the global one
    "all_triplets_sum": (lambda: losses.TripletMarginLoss(margin=0.5, reduction="sum"), None),
    "triplet_miner": (lambda: losses.TripletMarginLoss(margin=0.5), miners.BatchHardMiner),
    # draws at random: every rank must draw what rank 0 draws (each rank is seeded apart)
    "triplet_random_miner": (
        lambda: losses.TripletMarginLoss(margin=0.5),
        lambda: miners.DistanceWeightedMiner(cutoff=0.1, nonzero_loss_cutoff=2.0),
    ),
    "multi_similarity": (lambda: losses.MultiSimilarityLoss(), None),
    "ntxent": (lambda: losses.NTXentLoss(temperature=0.5), None),
    "lifted_structure": (lambda: losses.LiftedStructureLoss(), None),
    "proxy_nca": (lambda: losses.ProxyNCALoss(NUM_CLASSES, DIM), None),
    "proxy_anchor": (lambda: losses.ProxyAnchorLoss(NUM_CLASSES, DIM), None),
    "normalized_softmax": (lambda: losses.NormalizedSoftmaxLoss(NUM_CLASSES, DIM), None),
    # centres moved by the paper's rule (replicated only) and learned centres (both modes)
    "center": (lambda: losses.CenterLoss(NUM_CLASSES, DIM), None),
    "center_learned": (lambda: losses.CenterLoss(NUM_CLASSES, DIM, alpha=None), None),
    # a margin re-estimated every 2 steps from the batch (replicated only)
    "adaptive_margin": (
        lambda: losses.AdditiveMarginLoss(
            NUM_CLASSES, DIM, margin=losses.AdaptiveMargin(update_every=2)
        ),
        None,
    ),
}

# Row counts per rank and the labels of the global batch (rank 0's rows first).
LAYOUTS = {
    "even": ([4, 4], [0, 0, 1, 1, 2, 2, 3, 3]),
    # uneven rows; classes 0, 1 and the singleton 4 only on rank 0, class 3 only on rank 1
    "uneven": ([6, 3], [0, 0, 1, 1, 4, 2, 2, 3, 3]),
}


def supported_modes(family: str) -> list[str]:
    loss = FAMILIES[family][0]()
    return ["replicated"] + (["local_anchor"] if getattr(loss, "local_anchor_supported", 0) else [])


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().clamp_min(1e-300)
    return float((value - reference).abs().max() / scale)


def _train_both(rank, world, family, layout, mode):
    """(loss errors per step, parameter errors after steps 1 and 3) of DDP vs one process."""
    make_loss, make_miner = FAMILIES[family]
    sizes, labels = LAYOUTS[layout]
    labels = torch.tensor(labels)
    torch.manual_seed(0)
    model = nn.Linear(DIM_IN, DIM).double()
    loss = make_loss().double()
    reference_model, reference_loss = copy.deepcopy(model), copy.deepcopy(loss)
    ddp = DistributedDataParallel(model)
    wrapped = DistributedLoss(loss, mode, miner=None if make_miner is None else make_miner())
    miner = None if make_miner is None else make_miner()

    def optimiser(*modules):
        return torch.optim.SGD([p for m in modules for p in m.parameters()], 0.05, momentum=0.9)

    opt, reference_opt = optimiser(model, loss), optimiser(reference_model, reference_loss)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    loss_errors, parameter_errors = [], []
    for step in range(3):
        inputs = torch.randn(
            sum(sizes), DIM_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(step)
        )
        torch.manual_seed(1000 * rank + step)  # the ranks' random streams differ
        opt.zero_grad()
        value = wrapped(ddp(inputs[rows]), labels[rows])
        value.backward()
        average_gradients(loss.parameters())
        opt.step()

        torch.manual_seed(step)  # rank 0's stream
        reference_opt.zero_grad()
        embeddings = reference_model(inputs)
        tuples = None if miner is None else miner(embeddings, labels)
        expected = reference_loss(embeddings, labels, tuples)
        expected.backward()
        reference_opt.step()
        loss_errors.append(relative_error(value.detach(), expected.detach()))
        if step in (0, 2):
            pairs = zip(
                [*model.parameters(), *loss.parameters()],
                [*reference_model.parameters(), *reference_loss.parameters()],
                strict=True,
            )
            parameter_errors.append(max(relative_error(p, q) for p, q in pairs))
    return loss_errors, parameter_errors


def _worker(rank, world, cases):
    """Every check of this file that needs 2 processes, in one process group."""
    gathers = _gather_worker(rank, world)
    return gathers, {case: _train_both(rank, world, *case) for case in cases}


@pytest.fixture(scope="module")
def two_ranks():
    """The 2 ranks' results (process start-up costs seconds: one group for all checks)."""
    return run_ranks(_worker, 2, _cases(FAMILIES), timeout=420)


def _gather_worker(rank, world):
    """Direct checks of the gathers with uneven row counts."""
    sizes = [3, 1]
    x = torch.arange(sizes[rank] * 2, dtype=torch.float64).view(-1, 2) + 10 * rank
    x.requires_grad_(True)
    everyone = all_gather_with_grad(x)
    ids = all_gather_rows(torch.arange(sizes[rank]) + 100 * rank)
    weights = torch.arange(8, dtype=torch.float64).view(4, 2) * (rank + 1)
    (everyone * weights).sum().backward()  # rank r's loss: (r + 1) <w, X>
    replicated = x.detach().clone().requires_grad_(True)
    (all_gather_with_grad(replicated, replicated=True) * weights / (rank + 1)).sum().backward()
    return everyone.detach(), ids, x.grad, replicated.grad


def test_gather_with_gradient_uneven_rows(two_ranks):
    results = [gathers for gathers, _ in two_ranks]
    weights = torch.arange(8, dtype=torch.float64).view(4, 2)
    expected_rows = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(2.0).view(1, 2) + 10])
    for rank, (everyone, ids, grad, replicated_grad) in enumerate(results):
        assert torch.equal(everyone, expected_rows.double())
        assert ids.tolist() == [0, 1, 2, 100]
        rows = slice(0, 3) if rank == 0 else slice(3, 4)
        # the sum of the ranks' losses is 3 <w, X>: each rank gets its rows' share
        assert torch.equal(grad, 3 * weights[rows])
        # replicated: every rank computes <w, X>; rows get W times their gradient
        assert torch.equal(replicated_grad, 2 * weights[rows])


def _cases(families):
    return [
        (family, layout, mode)
        for family in families
        for layout in LAYOUTS
        for mode in supported_modes(family)
    ]


def test_ddp_equals_one_process_for_every_family_and_mode(two_ranks):
    assert len(two_ranks[0][1]) == len(_cases(FAMILIES)) > len(FAMILIES)
    for rank, (_, by_case) in enumerate(two_ranks):
        for case, (loss_errors, parameter_errors) in by_case.items():
            assert max(loss_errors) < 1e-10, (rank, case, loss_errors)
            assert max(parameter_errors) < 1e-10, (rank, case, parameter_errors)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_modes_are_accepted_or_refused_with_a_reason(family):
    loss = FAMILIES[family][0]()
    assert check_mode(loss, "replicated") == "replicated"
    if getattr(loss, "local_anchor_supported", False):
        assert check_mode(loss, "local_anchor") == "local_anchor"
    else:
        with pytest.raises(ValueError, match="cannot run in mode='local_anchor'") as error:
            DistributedLoss(loss, mode="local_anchor")
        assert "replicated" in str(error.value)


def test_mode_is_checked_on_assignment():
    wrapped = DistributedLoss(losses.ContrastiveLoss())
    with pytest.raises(ValueError, match="mode must be one of"):
        wrapped.mode = "scattered"


def test_single_process_is_the_wrapped_loss():
    x, y = torch.randn(8, 4, requires_grad=True), torch.arange(8) // 2
    for family, (make_loss, make_miner) in FAMILIES.items():
        torch.manual_seed(0)
        loss = make_loss()
        torch.manual_seed(0)
        plain = make_loss()
        miner = None if make_miner is None else make_miner()
        torch.manual_seed(1)  # the same draws for a miner that draws at random
        tuples = None if miner is None else miner(x, y)
        expected = plain(x, y, tuples)
        for mode in supported_modes(family):
            torch.manual_seed(1)
            value = DistributedLoss(loss, mode, miner=miner)(x, y)
            torch.testing.assert_close(value, expected, msg=f"{family} {mode}")


def test_tuples_mined_outside_the_wrapper_are_refused():
    x, y = torch.randn(8, 4), torch.arange(8) // 2
    tuples = miners.BatchHardMiner()(x, y)
    with pytest.raises(ValueError, match="miner=") as error:
        DistributedLoss(losses.TripletMarginLoss())(x, y, tuples)
    assert "indices_tuple" in str(error.value)
