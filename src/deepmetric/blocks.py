"""Block iteration over a (query x reference) matrix and gradient accumulation.

The one place that decides how the N x M work of the distances, the pair and triplet
kernels, the structured losses and the miners is cut into blocks of query rows, and how
their gradients are accumulated:

- `row_blocks` / `RowBlocks`: slices of rows whose (rows, M) blocks hold about
  BLOCK_ELEMENTS entries (matrix products), PASS_BLOCK_ELEMENTS entries (chains of
  elementwise passes, which stay in cache) or SWEEP_BLOCK_ELEMENTS (a `Sweep`, whose autograd
  keeps a few block-sized temporaries); `RowBlocks.buffer` reuses work arrays from block to
  block;
- `Sweep`: the sum over row blocks of an objective of D[rows] = distance(query[rows], ref),
  with its gradients with respect to the query, the reference set and any parameter
  accumulated block by block (autograd on block-sized tensors), so that a loss on the whole
  matrix costs O(block + N D) memory; `Sweep.run_gradient` takes dL/dD[rows] in closed form;
- `backward_by_autograd`: the backward of a fused autograd Function under create_graph.

Double backward (create_graph=True), one policy: the fused autograd Functions (the Euclidean
matrix, the contrastive sums, the all-triplets sums) are differentiable twice, because under
create_graph their backward recomputes the forward by plain differentiable steps
(`backward_by_autograd`; slower, (N, M)-sized, meant for gradient penalties). Losses
evaluated by a `Sweep` (the structured losses) keep only first derivatives and refuse
create_graph with a RuntimeError, rather than return a silently wrong second derivative.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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


class Sweep:
    """Sum over row blocks of an objective of D[rows], with the gradients of that sum.

    `run(objective)` calls `objective(block, rows)` for each block of anchor rows, where
    `block` = distance(embeddings[rows], ref) is differentiable, and accumulates the value and
    its gradient with respect to the embeddings, the reference set, the distance's parameters
    and `params`. `result(value, scale)` returns `value` wired to `scale` times those gradients.
    Without grad mode, or when nothing requires a gradient, only values are computed.

    The distance's normalisation (`distance.normalize`, e.g. the cosine family's) is applied
    once to each set, and each block is `distance.compute_matrix` of the normalised rows: the
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
        self.grads: list[Tensor] | None = None

    def blocks(self) -> Iterator[tuple[slice, Tensor]]:
        """(rows, D[rows]) for each block, without gradient (for statistics)."""
        with torch.no_grad():
            for rows in row_blocks(self.num_rows, self.num_cols, SWEEP_BLOCK_ELEMENTS):
                yield (
                    rows,
                    self.distance.compute_matrix(self.query[rows].detach(), self.ref.detach()),
                )

    def run(self, objective: Callable[[Tensor, slice], Tensor]) -> Tensor:
        """Sum of objective(D[rows], rows) over the blocks; its gradients are accumulated."""
        total = None
        for rows in row_blocks(self.num_rows, self.num_cols, SWEEP_BLOCK_ELEMENTS):
            with torch.set_grad_enabled(self.tracking):
                value = objective(self.distance.compute_matrix(self.query[rows], self.ref), rows)
            if self.tracking and value.requires_grad:
                self._accumulate(torch.autograd.grad(value, self.leaves, allow_unused=True))
            value = value.detach()
            total = value if total is None else total + value
        return total

    def run_gradient(self, block_gradient: Callable[[Tensor, slice], Tensor]) -> None:
        """Accumulate the gradients of a loss whose gradient in D[rows] is given directly.

        `block_gradient(D[rows], rows)` (called without gradient) returns dL/dD[rows]; it is
        pulled back through the distance. Cheaper than `run` when the derivative in D is
        known in closed form (no autograd through the loss's elementwise steps).
        """
        if not self.tracking:
            return
        for rows in row_blocks(self.num_rows, self.num_cols, SWEEP_BLOCK_ELEMENTS):
            with torch.enable_grad():
                block = self.distance.compute_matrix(self.query[rows], self.ref)
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

    def result(self, value: Tensor, scale: float | Tensor = 1.0) -> Tensor:
        """`value` as a loss whose gradient is `scale` times the accumulated gradients."""
        if not self.targets:
            return value
        if self.grads is None:
            self.grads = [torch.zeros_like(leaf) for leaf in self.leaves]
        grads = [grad * scale for grad in self.grads]
        return _WithGradients.apply(value.detach(), grads, *self.targets)


class _WithGradients(torch.autograd.Function):
    """Identity on a precomputed loss value; backward returns the precomputed gradients."""

    @staticmethod
    def forward(ctx, value, grads, *targets):  # noqa: D102
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        if torch.is_grad_enabled():
            raise RuntimeError(
                "this loss was differentiated block by block (deepmetric.blocks.Sweep), so it "
                "has no graph of its gradient: double backward (create_graph=True) is not "
                "supported; use a loss built on the fused Functions (contrastive, triplet) or "
                "compute the gradient penalty on another loss"
            )
        return (None, None, *(grad * grad_output for grad in ctx.grads))
