"""A batch spread over processes (SPEC §8): gathering with gradients, losses and miners over
the global batch, on torch.distributed (gloo on CPU, nccl on GPU), launched with torchrun.

Each of the W ranks embeds its own rows x_r (n_r rows; the n_r may differ). A pair, triplet
or structured loss needs the global batch X = [x_0; x_1; ...; x_{W-1}] (rank order), so
`all_gather_with_grad` gathers it *with* its autograd graph, and `DistributedLoss` computes
the loss L(X) in one of two modes:

- ``"replicated"``: every rank computes L(X) itself. Always exact, whatever the loss.
- ``"local_anchor"``: rank r computes only the terms of its own anchors against the global
  reference set X, L_r = S_r / Z, where S_r is the sum of its terms and Z = sum_r z_r the
  reduction's normaliser summed over ranks (e.g. the count of non-zero terms). L = sum_r L_r
  is exact for losses that are sums over anchors, at 1/W of the work. A loss states whether
  it can run this way (`local_anchor_supported`); one that cannot refuses the mode and says
  why (`local_anchor_reason`). Losses whose references are class vectors (proxies, class
  weights: replicated parameters) run it with no gather at all.

Gradients are arranged for DistributedDataParallel, which *averages* parameter gradients
over ranks: rank r back-propagates W times its share of L, so each row of x_r receives
W dL/dx_r and the average over ranks is the exact dL/dtheta of one process training on X
(the known traps: a gather without gradient, gradients off by the factor W). The loss value
returned on every rank is L itself. Loss parameters (proxies) are not inside the DDP model:
average their gradients with `average_gradients` after backward.

Miners run on the gathered batch (indices into X, identical on every rank; a miner that
draws at random draws from rank 0's random stream on every rank), so in local-anchor mode
each rank keeps the tuples whose anchor is one of its rows.

    loss_fn = DistributedLoss(TripletMarginLoss(margin=0.2), mode="replicated")
    loss = loss_fn(model(x), y)  # the loss of the global batch, on every rank
    loss.backward()  # DDP averages: exact single-process gradients
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepmetric._validation import HyperParameter, check_choice, check_labels

__all__ = [
    "MODES",
    "DistributedLoss",
    "all_gather_rows",
    "all_gather_with_grad",
    "all_reduce_with_grad",
    "average_gradients",
    "broadcast_module",
    "check_mode",
    "gather_sizes",
    "rank_and_world_size",
]

MODES = ("replicated", "local_anchor")

_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(
    dist, "all_gather_into_tensor", None
)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(
    dist, "reduce_scatter_tensor", None
)


def rank_and_world_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) of this process in `group`; (0, 1) when torch.distributed is not
    initialised, so every function here also works in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_sizes(rows: int, device: torch.device, group: dist.ProcessGroup | None = None) -> list:
    """The row counts of every rank, in rank order (one small all_gather)."""
    _, world = rank_and_world_size(group)
    if world == 1:
        return [rows]
    local = torch.tensor([rows], dtype=torch.long, device=device)
    sizes = torch.empty(world, dtype=torch.long, device=device)
    _all_gather_single(sizes, local, group=group)
    return sizes.tolist()


def _gather_padded(tensor: Tensor, sizes: list, group: dist.ProcessGroup | None) -> Tensor:
    """All ranks' rows in rank order: pad to the largest count, one all_gather, unpad."""
    width = max(sizes)
    padded = tensor.new_zeros((width, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    out = tensor.new_empty((len(sizes) * width, *tensor.shape[1:]))
    _all_gather_single(out, padded, group=group)
    if all(size == width for size in sizes):
        return out
    return torch.cat([out[r * width : r * width + size] for r, size in enumerate(sizes)])


def all_gather_rows(
    tensor: Tensor, group: dist.ProcessGroup | None = None, sizes: list | None = None
) -> Tensor:
    """Every rank's rows of `tensor` concatenated in rank order, without gradient.

    Ranks may hold different numbers of rows (`sizes`, gathered when not given); the other
    dimensions must agree. Works for labels and ids (integer tensors) as for embeddings.

    Example (one process: the tensor itself):
        >>> all_gather_rows(torch.arange(3)).tolist()
        [0, 1, 2]
    """
    _, world = rank_and_world_size(group)
    if world == 1:
        return tensor.detach()
    sizes = gather_sizes(len(tensor), tensor.device, group) if sizes is None else sizes
    return _gather_padded(tensor.detach().contiguous(), sizes, group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the gradient of its own rows.

    Backward sums the upstream gradients of all ranks (one reduce-scatter): the gradient of
    the sum of the ranks' losses. With `replicated`, every rank's upstream gradient is the
    same (each computed the same function of the gathered rows), so the sum is W times the
    local one and no communication is needed.
    """

    @staticmethod
    def forward(ctx, tensor, sizes, group, replicated):  # noqa: D102
        ctx.sizes, ctx.group, ctx.replicated = sizes, group, replicated
        return _gather_padded(tensor.contiguous(), sizes, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        sizes, group = ctx.sizes, ctx.group
        rank, world = rank_and_world_size(group)
        start = sum(sizes[:rank])
        if ctx.replicated:
            return grad[start : start + sizes[rank]] * world, None, None, None
        width = max(sizes)
        padded = grad.new_zeros((world * width, *grad.shape[1:]))
        offset = 0
        for r, size in enumerate(sizes):
            padded[r * width : r * width + size] = grad[offset : offset + size]
            offset += size
        out = grad.new_empty((width, *grad.shape[1:]))
        _reduce_scatter_single(out, padded, op=dist.ReduceOp.SUM, group=group)
        return out[: sizes[rank]], None, None, None


def all_gather_with_grad(
    tensor: Tensor,
    group: dist.ProcessGroup | None = None,
    sizes: list | None = None,
    *,
    replicated: bool = False,
) -> Tensor:
    """Every rank's rows of `tensor` in rank order, differentiable: the gradient that flows
    back to this rank's rows is the sum, over all ranks, of the gradients of their rows.

    Backward is a collective: every rank must call backward on a loss that uses the result.
    `replicated=True` promises that every rank computes the same function of the result
    (the replicated mode), which lets backward skip the communication (the sum over ranks
    is then W times the local gradient). Ranks may hold different numbers of rows.

    Example (one process: the tensor itself, gradient unchanged):
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> all_gather_with_grad(x).sum().backward()
        >>> x.grad.sum().item()
        6.0
    """
    _, world = rank_and_world_size(group)
    if world == 1:
        return tensor
    sizes = gather_sizes(len(tensor), tensor.device, group) if sizes is None else sizes
    return _GatherWithGrad.apply(tensor, sizes, group, replicated)


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward sums the ranks' gradients (the gradient of the sum of
    the ranks' losses)."""

    @staticmethod
    def forward(ctx, tensor, group):  # noqa: D102
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def all_reduce_with_grad(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The sum of `tensor` over ranks, differentiable (backward sums the ranks' gradients).

    Example (one process: the tensor itself):
        >>> all_reduce_with_grad(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    _, world = rank_and_world_size(group)
    return tensor if world == 1 else _AllReduceWithGrad.apply(tensor, group)


def average_gradients(parameters: Iterable[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Average the gradients of `parameters` over ranks in place (one all_reduce), as DDP does
    for the model; for parameters outside the DDP model, e.g. a loss's proxies."""
    _, world = rank_and_world_size(group)
    grads = [p.grad for p in parameters if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast_module(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Copy rank 0's parameters and buffers of `module` to every rank (e.g. a loss's
    randomly initialised proxies, which DDP does not broadcast)."""
    _, world = rank_and_world_size(group)
    if world == 1:
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src, group=group)


@contextlib.contextmanager
def _rank0_random_stream(device: torch.device, group: dist.ProcessGroup | None) -> Iterator[None]:
    """Inside the block every rank draws the random numbers rank 0 draws; rank 0's stream
    advances as in a single process, the others' are left untouched."""
    rank, world = rank_and_world_size(group)
    if world == 1:
        yield
        return
    cuda = device.type == "cuda"
    state = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
    shared = state.to(device) if cuda else state.clone()
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(shared, src=src, group=group)
    if rank == 0:
        yield
        return
    devices = [device] if cuda else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if cuda else "cuda"):
        if cuda:
            torch.cuda.set_rng_state(shared.cpu(), device)
        else:
            torch.set_rng_state(shared.cpu())
        yield


def _loss_supports_local_anchor(loss: nn.Module) -> tuple[bool, str]:
    supported = getattr(loss, "local_anchor_supported", None)
    if supported is None:
        return False, (
            f"{type(loss).__name__} does not declare local_anchor_supported (a loss must say "
            "whether it is a sum over anchors and report loss_sum and normaliser in its stats)"
        )
    return bool(supported), getattr(loss, "local_anchor_reason", "")


def check_mode(loss: nn.Module, mode: str) -> str:
    """Return `mode` if `loss` can run in it; raise a ValueError that says why not."""
    check_choice(mode, "mode", MODES)
    if mode == "local_anchor":
        supported, reason = _loss_supports_local_anchor(loss)
        if not supported:
            raise ValueError(
                f"{type(loss).__name__} cannot run in mode='local_anchor': {reason}; "
                "use mode='replicated' (every rank computes the global loss, always exact)"
            )
    return mode


def _reduction(loss: nn.Module) -> str:
    """The reduction of a loss, looking through a cross-batch memory wrapper."""
    inner = getattr(loss, "loss", loss)
    return getattr(inner, "reduction", "mean")


def _takes_class_vectors(loss: nn.Module) -> bool:
    """Whether the loss compares embeddings with its own class vectors (proxies, class
    weights), not with other rows: such a loss needs no gather in local-anchor mode."""
    return getattr(loss, "num_classes", None) is not None


def _local_tuples(tuples: tuple, start: int, stop: int) -> tuple:
    """The mined tuples whose anchor is one of the rows start..stop-1 of the global batch,
    anchors re-indexed to the local rows (positives and negatives stay global)."""
    halves = [tuples] if len(tuples) == 3 else [tuples[:2], tuples[2:]]
    kept = []
    for half in halves:
        anchor = half[0]
        mine = (anchor >= start) & (anchor < stop)
        kept += [anchor[mine] - start, *(t[mine] for t in half[1:])]
    return tuple(kept)


class DistributedLoss(nn.Module):
    """A batch loss over the global batch of all ranks, in replicated or local-anchor mode.

    Called on each rank with that rank's rows; returns the loss of the global batch (the
    same value on every rank) whose gradient, averaged over ranks by DDP, is the exact
    gradient of one process on the concatenated batch (see the module docstring). In a
    single process (torch.distributed not initialised) it is the wrapped loss.

    Args:
        loss: any batch loss of deepmetric.losses (or a `CrossBatchMemoryLoss`).
        mode: "replicated" (every rank computes the global loss; any loss) or
            "local_anchor" (each rank its own anchors against the global references;
            losses with `local_anchor_supported`).
        miner: an optional miner, run on the gathered batch.
        group: the process group (default: the world).

    Example (one process):
        >>> from deepmetric.losses import ContrastiveLoss
        >>> loss_fn = DistributedLoss(ContrastiveLoss(), mode="replicated")
        >>> x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
        >>> bool(loss_fn(x, y) == ContrastiveLoss()(x, y))
        True
    """

    mode = HyperParameter(lambda value, name: check_choice(value, name, MODES))

    def __init__(
        self,
        loss: nn.Module,
        mode: str = "replicated",
        miner: nn.Module | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.loss, self.miner, self.group = loss, miner, group
        self.mode = check_mode(loss, mode)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: None = None,
        *,
        ids: Tensor | None = None,
    ) -> Tensor:
        """The global batch's loss. `ids` (optional, one integer per row, e.g. dataset
        indices) mark rows that are the same item; they are never paired. Tuples mined on
        one rank's rows would index the wrong set: give the miner to the wrapper instead."""
        if indices_tuple is not None:
            raise ValueError(
                "indices_tuple mined on one rank's rows cannot index the global batch: pass "
                "the miner as DistributedLoss(loss, mode, miner=...) and call it without tuples"
            )
        check_mode(self.loss, self.mode)
        check_labels(labels, len(embeddings))
        if ids is not None:
            check_labels(ids, len(embeddings), "ids")
        rank, world = rank_and_world_size(self.group)
        if self.mode == "local_anchor" and _takes_class_vectors(self.loss):
            return self._local_class_vectors(embeddings, labels, world)
        sizes = gather_sizes(len(embeddings), embeddings.device, self.group)
        replicated = self.mode == "replicated"
        everyone = all_gather_with_grad(embeddings, self.group, sizes, replicated=replicated)
        all_labels = all_gather_rows(labels, self.group, sizes)
        all_ids = None if ids is None else all_gather_rows(ids, self.group, sizes)
        memory = getattr(self.loss, "memory", None)
        if replicated:  # every rank computes the same loss: same random draws as rank 0
            with _rank0_random_stream(embeddings.device, self.group):
                tuples = self._mine(everyone, all_labels)
                extra = {} if all_ids is None else {"query_ids": all_ids}
                return self.loss(everyone, all_labels, tuples, **extra)
        with _rank0_random_stream(embeddings.device, self.group):
            tuples = self._mine(everyone, all_labels)
        start = sum(sizes[:rank])
        stop = start + sizes[rank]
        if tuples is not None:
            tuples = _local_tuples(tuples, start, stop)
        if all_ids is None:  # rows are told apart by position (new items for a memory)
            total = sum(sizes)
            fresh = torch.arange(total, device=embeddings.device)
            all_ids = fresh if memory is None else memory.fresh_ids(total)
        self.loss(
            everyone[start:stop],
            labels,
            tuples,
            ref_emb=everyone,
            ref_labels=all_labels,
            query_ids=all_ids[start:stop],
            ref_ids=all_ids,
        )
        return self._sum_over_ranks(world)

    def _mine(self, everyone: Tensor, all_labels: Tensor) -> tuple | None:
        """The miner's tuples over the global batch (indices into it), or None."""
        if self.miner is None:
            return None
        if getattr(self.loss, "memory", None) is not None:
            raise ValueError(
                "the loss has a cross-batch memory, which extends the references the miner "
                "must index: pass the miner to CrossBatchMemoryLoss(miner=...), not here"
            )
        return self.miner(everyone.detach(), all_labels)

    def _local_class_vectors(self, embeddings: Tensor, labels: Tensor, world: int) -> Tensor:
        """Local-anchor mode of a class-vector loss: the local rows only, no gather."""
        self.loss(embeddings, labels)
        return self._sum_over_ranks(world)

    def _sum_over_ranks(self, world: int) -> Tensor:
        """L = sum_r S_r / sum_r z_r from the wrapped loss's stats; differentiable as W L_r.

        A "sum" reduction divides by 1 on every rank, so its normaliser is 1, not W."""
        stats = self.loss.stats
        loss_sum = stats.loss_sum
        totals = torch.stack(
            [loss_sum.detach().double(), torch.as_tensor(stats.normaliser).to(loss_sum).double()]
        )
        if world > 1:
            dist.all_reduce(totals, group=self.group)
        total, normaliser = totals.to(loss_sum.dtype).unbind()
        if _reduction(self.loss) == "sum":
            normaliser = torch.ones_like(normaliser)
        normaliser = normaliser.clamp_min(1)
        local = loss_sum * (world / normaliser)
        return local + (total / normaliser - local).detach()
