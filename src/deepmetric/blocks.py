"""Block iteration over a (query x reference) matrix and gradient accumulation.

The one place that decides how the N x M work of the distances, the pair and triplet
kernels, the structured losses and the miners is cut into blocks of query rows, and how
their gradients are accumulated:

- `row_blocks` / `RowBlocks`: slices of rows whose (rows, M) blocks hold about
  BLOCK_ELEMENTS entries (matrix products), PASS_BLOCK_ELEMENTS entries (chains of
  elementwise passes, which stay in cache; also a `Sweep`'s closed-form steps) or
  SWEEP_BLOCK_ELEMENTS (a `Sweep`'s autograd objectives, which keep a few block-sized
  temporaries); `RowBlocks.buffer` reuses work arrays from block to block;
- `Sweep`: the sum over row blocks of an objective of D[rows] = distance(query[rows], ref),
  with its gradients with respect to the query, the reference set and any parameter
  accumulated block by block, so that a loss on the whole matrix costs O(block + N D)
  memory: autograd on block-sized objectives (`Sweep.run`), or the gradient in D written out
  (`Sweep.run_closed_form`, `Sweep.run_gradient`);
- `backward_by_autograd`: the backward of a fused distance matrix under create_graph.

Double backward (create_graph=True), one policy: every loss is twice differentiable. The
engine (`Sweep`) accumulates first derivatives without a graph; when a graph of the gradient
is asked for, it replays the loss's objectives as plain differentiable steps on the whole
(N, M) matrix and differentiates that (slower, (N, M)-sized, meant for gradient penalties).
The fused distance matrices follow the same rule with `backward_by_autograd`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # distances import this module for their own blocks
    from deepmetric.distances import BaseDistance

__all__ = [
    "BLOCK_ELEMENTS",
    "PASS_BLOCK_ELEMENTS",
    "SWEEP_BLOCK_ELEMENTS",
    "RowBlocks",
    "Sweep",
    "backward_by_autograd",
    "replaying",
    "row_blocks",
]

BLOCK_ELEMENTS = 1 << 22
"""Entries per row block for matrix products: 16 MiB of float32, served from malloc's heap
(larger arrays are mapped afresh on every allocation and pay their page faults each time)."""

PASS_BLOCK_ELEMENTS = 1 << 20
"""Entries per row block for chains of elementwise passes: the few arrays of a block stay in
cache between passes."""


SWEEP_BLOCK_ELEMENTS = 1 << 21
"""Entries per row block of a `Sweep`: autograd keeps a few block-sized temporaries of the
loss alive at once, so blocks sit between the two sizes above."""


def row_blocks(num_rows: int, num_cols: int, elements: int | None = None) -> Iterator[slice]:
    """Slices of rows whose (rows, num_cols) blocks hold about `elements` entries each
    (default BLOCK_ELEMENTS, read when called so that tests can shrink it)."""
    elements = BLOCK_ELEMENTS if elements is None else elements
    step = max(1, elements // max(num_cols, 1))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


class RowBlocks:
    """The row blocks of an (N, M) matrix, and work arrays reused from block to block.

    Iterating gives the slices of `row_blocks`, of BLOCK_ELEMENTS entries, or of
    PASS_BLOCK_ELEMENTS with `passes=True` (for chains of elementwise passes). `buffer(name,
    like)` gives an array of the current block's shape that is the same memory in every
    block, so each work array is allocated, and its pages faulted in, once per call instead
    of once per block (freed arrays of a few MiB are otherwise handed back to the system by
    malloc and mapped again).
    """

    def __init__(self, num_rows: int, num_cols: int, passes: bool = False) -> None:
        self.num_rows, self.num_cols = num_rows, num_cols
        elements = PASS_BLOCK_ELEMENTS if passes else BLOCK_ELEMENTS
        self.step = max(1, elements // max(num_cols, 1))
        self._rows = 0
        self._buffers: dict[str, Tensor] = {}

    def __iter__(self) -> Iterator[slice]:
        for start in range(0, self.num_rows, self.step):
            stop = min(start + self.step, self.num_rows)
            self._rows = stop - start
            yield slice(start, stop)

    def buffer(self, name: str, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The work array `name` for the current block, uninitialised, dtype of `like`."""
        dtype = like.dtype if dtype is None else dtype
        array = self._buffers.get(name)
        if array is None or array.dtype != dtype:
            shape = (min(self.step, self.num_rows), self.num_cols)
            array = self._buffers[name] = like.new_empty(shape, dtype=dtype)
        return array[: self._rows]


def backward_by_autograd(function, inputs, grad_outputs) -> list[Tensor | None]:
    """Gradients of `function()` with respect to `inputs` (None entries are skipped), with
    their own graph: the backward of a fused autograd Function when a graph of the gradient
    is asked for (`create_graph=True`, e.g. a gradient penalty). `function` recomputes the
    Function's outputs from its saved inputs by plain differentiable operations."""
    wanted = [tensor for tensor in inputs if tensor is not None]
    with torch.enable_grad():
        grads = iter(
            torch.autograd.grad(
                function(), wanted, grad_outputs, create_graph=True, allow_unused=True
            )
        )
    return [None if tensor is None else next(grads) for tensor in inputs]


_REPLAYING: ContextVar[bool] = ContextVar("deepmetric_sweep_replaying", default=False)


def replaying() -> bool:
    """Whether a `Sweep` is replaying its objectives for a second derivative (objectives then
    leave their side effects, such as counting terms for the stats, undone)."""
    return _REPLAYING.get()


class Sweep:
    """Sum over row blocks of an objective of D[rows], with the gradients of that sum.

    The one engine of the losses on the (N, M) matrix D = distance(embeddings, ref). Three
    ways to feed it, all accumulating the gradient with respect to the embeddings, the
    reference set, the distance's parameters and `params` block by block:

    - `run(objective)`: `objective(D[rows], rows)` is a differentiable scalar; autograd
      differentiates it on the block;
    - `run_closed_form(step, plain)`: `step(D[rows], rows, work)` returns (value, dL/dD[rows])
      written out (counting, sorting: no autograd through the loss's steps); D[rows] is
      computed once and its gradient pulled back at once, one pass over the matrix;
    - `run_gradient(block_gradient, plain)`: only dL/dD[rows], when the value came from an
      earlier pass (`blocks()`, without gradient) over statistics of whole rows or columns.

    `result(value, scale)` returns `value` wired to `scale` times the accumulated gradients.
    Without grad mode, or when nothing requires a gradient, only values are computed.

    Second derivatives (create_graph=True): the accumulated gradients have no graph, so the
    backward of `result` replays the sweep as plain differentiable steps over the whole
    (N, M) matrix: the sum of the objectives of `run`, and of the `plain(D, rows)` forms
    given with the closed-form ones, on D = distance(embeddings, ref) with rows = all rows,
    differentiated with create_graph. Same values, (N, M) memory, meant for gradient
    penalties.

    The distance's normalisation (`distance.normalize`, e.g. the cosine family's) is applied
    once to each set, and each block is `distance.compute_block` of the normalised rows: the
    gradients are accumulated with respect to the normalised sets and passed back through
    the normalisation once, by autograd, when the loss is differentiated.
    """

    def __init__(
        self,
        query: Tensor,
        ref: Tensor,
        ref_is_query: bool,
        distance: BaseDistance,
        params: Sequence[Tensor] = (),
    ) -> None:
        self.distance = distance
        self.num_rows, self.num_cols = len(query), len(ref)
        query = distance.normalize(query)
        ref = query if ref_is_query else distance.normalize(ref)
        self._sets = (query, ref)
        inputs = [query] if ref_is_query else [query, ref]
        extra = [p for p in (*distance.parameters(), *params) if p.requires_grad]
        self.tracking = torch.is_grad_enabled() and (
            any(t.requires_grad for t in inputs) or bool(extra)
        )
        self.targets: list[Tensor] = []
        self.leaves: list[Tensor] = []
        self.query, self.ref = query, ref
        if self.tracking:
            self.query = query.detach().requires_grad_(query.requires_grad)
            self.ref = (
                self.query if ref_is_query else ref.detach().requires_grad_(ref.requires_grad)
            )
            for original, leaf in zip(inputs, [self.query, self.ref], strict=False):
                if original.requires_grad:
                    self.targets.append(original)
                    self.leaves.append(leaf)
            self.targets += extra
            self.leaves += extra
        self.ref_is_query = ref_is_query
        self.grads: list[Tensor] | None = None
        self._plain: list[Callable[[Tensor, slice], Tensor]] = []

    @property
    def one_closed_form_block(self) -> bool:
        """Whether `run_closed_form` takes the whole matrix as one block (its step then sees
        every entry, e.g. every count of the call, before it writes its gradient)."""
        return RowBlocks(self.num_rows, self.num_cols, passes=True).step >= self.num_rows

    def _block(self, rows: slice) -> Tensor:
        """D[rows], the distance of the normalised query rows to the reference set."""
        return self.distance.compute_block(self.query, self.ref, rows, self.ref_is_query)

    def blocks(self) -> Iterator[tuple[slice, Tensor]]:
        """(rows, D[rows]) for each block, without gradient (for statistics)."""
        with torch.no_grad():
            for rows in row_blocks(self.num_rows, self.num_cols, SWEEP_BLOCK_ELEMENTS):
                yield rows, self._block(rows)

    def run(self, objective: Callable[[Tensor, slice], Tensor]) -> Tensor:
        """Sum of objective(D[rows], rows) over the blocks; its gradients are accumulated."""
        self._plain.append(objective)
        total = None
        for rows in row_blocks(self.num_rows, self.num_cols, SWEEP_BLOCK_ELEMENTS):
            with torch.set_grad_enabled(self.tracking):
                value = objective(self._block(rows), rows)
            if self.tracking and value.requires_grad:
                self._accumulate(torch.autograd.grad(value, self.leaves, allow_unused=True))
            value = value.detach()
            total = value if total is None else total + value
        return total

    def run_closed_form(
        self,
        step: Callable[[Tensor, slice, RowBlocks], tuple[Tensor, Tensor | None]],
        plain: Callable[[Tensor, slice], Tensor],
    ) -> Tensor:
        """Sum of the values of `step(D[rows], rows, work)` -> (value, dL/dD[rows]) over the
        blocks.

        `step` runs without gradient on each block and gives its gradient in D in closed
        form (None when `self.tracking` is False: it is not used); the block is computed
        once and the gradient pulled back through the distance at once. `work` is the
        `RowBlocks` of the sweep (PASS_BLOCK_ELEMENTS entries per block: the steps are chains
        of elementwise passes), whose `buffer`s are reused from block to block. `plain(D,
        rows)` is the same value by differentiable steps (second derivatives).
        """
        self._plain.append(plain)
        total = None
        work = RowBlocks(self.num_rows, self.num_cols, passes=True)
        for rows in work:
            with torch.set_grad_enabled(self.tracking):
                block = self._block(rows)
            with torch.no_grad():
                value, grad = step(block.detach(), rows, work)
            if self.tracking and block.requires_grad:
                self._accumulate(torch.autograd.grad(block, self.leaves, grad, allow_unused=True))
            total = value if total is None else total + value
        return total

    def run_gradient(
        self,
        block_gradient: Callable[[Tensor, slice], Tensor],
        plain: Callable[[Tensor, slice], Tensor],
    ) -> None:
        """Accumulate the gradients of a loss whose gradient in D[rows] is given directly.

        `block_gradient(D[rows], rows)` (called without gradient) returns dL/dD[rows]; it is
        pulled back through the distance. `plain(D, rows)` is the loss by differentiable
        steps (second derivatives). For a value computed by an earlier pass over `blocks()`.
        """
        self._plain.append(plain)
        if not self.tracking:
            return
        for rows in row_blocks(self.num_rows, self.num_cols, SWEEP_BLOCK_ELEMENTS):
            with torch.enable_grad():
                block = self._block(rows)
            with torch.no_grad():
                grad = block_gradient(block.detach(), rows)
            if block.requires_grad:
                self._accumulate(torch.autograd.grad(block, self.leaves, grad, allow_unused=True))

    def _accumulate(self, grads: Sequence[Tensor | None]) -> None:
        if self.grads is None:
            self.grads = [torch.zeros_like(leaf) for leaf in self.leaves]
        for acc, grad in zip(self.grads, grads, strict=True):
            if grad is not None:
                acc += grad

    def replay(self) -> Tensor:
        """The swept sum by plain differentiable steps on the whole matrix (see the class)."""
        query, ref = self._sets
        matrix = self.distance.compute_matrix(query, ref)
        token = _REPLAYING.set(True)
        try:
            everything = slice(0, self.num_rows)
            return sum(plain(matrix, everything) for plain in self._plain)
        finally:
            _REPLAYING.reset(token)

    def result(self, value: Tensor, scale: float | Tensor = 1.0) -> Tensor:
        """`value` as a loss whose gradient is `scale` times the accumulated gradients."""
        if not self.targets:
            return value
        if self.grads is None:
            self.grads = [torch.zeros_like(leaf) for leaf in self.leaves]
        grads = [grad * scale for grad in self.grads]
        return _WithGradients.apply(value.detach(), grads, (self, scale), *self.targets)


class _WithGradients(torch.autograd.Function):
    """Identity on a precomputed loss value; backward returns the precomputed gradients, or,
    when a graph of the gradient is asked for, differentiates the sweep's replay."""

    @staticmethod
    def forward(ctx, value, grads, replay, *targets):  # noqa: D102
        ctx.grads, ctx.replay, ctx.targets = grads, replay, targets
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        if not torch.is_grad_enabled():
            return (None, None, None, *(grad * grad_output for grad in ctx.grads))
        sweep, scale = ctx.replay
        targets = ctx.targets
        value = sweep.replay() * scale
        grads = torch.autograd.grad(
            value, targets, grad_output, create_graph=True, allow_unused=True
        )
        grads = [
            torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads, strict=True)
        ]
        return (None, None, None, *grads)
