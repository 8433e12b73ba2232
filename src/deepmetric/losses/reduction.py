"""How per-term losses become one number: `reduction="mean" | "nonzero_mean" | "sum"`.

- "mean": the sum over all terms divided by the number of terms (pairs, triplets, anchors).
- "nonzero_mean": the sum divided by the number of terms that are > 0 (the "active" ones);
  0 when none is active.
- "sum": the plain sum.

An empty set of terms (no positive pair, no negative) gives a zero loss that is still
connected to the graph, so `loss.backward()` works and every gradient is zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deepmetric._validation import check_choice

REDUCTIONS = ("mean", "nonzero_mean", "sum")


def check_reduction(reduction: str) -> str:
    """Return `reduction` if it is one of REDUCTIONS; raise a ValueError otherwise."""
    return check_choice(reduction, "reduction", REDUCTIONS)


def zero_with_graph(*tensors: Tensor) -> Tensor:
    """A scalar 0 that depends on `tensors`, so backward() runs and yields zero gradients."""
    return sum(t.sum() * 0 for t in tensors)


def reduce_terms(terms: Tensor, reduction: str, mask: Tensor | None = None) -> Tensor:
    """Reduce non-negative loss terms; `mask` (same shape) selects which entries are terms."""
    if mask is None:
        total, count = terms.sum(), terms.numel()
    else:
        terms = terms * mask
        total, count = terms.sum(), mask.sum()
    if reduction == "sum":
        return total
    if reduction == "nonzero_mean":
        count = (terms > 0).sum()
    return total / torch.as_tensor(count, device=terms.device).clamp_min(1)


def reduction_normaliser(reduction: str, num_terms: Tensor, num_nonzero: Tensor) -> Tensor:
    """The count a reduction divides the sum of terms by, before clamping at 1 (1 for "sum").

    Reported as `normaliser` in the stats of the losses that support local-anchor mode, next
    to `loss_sum`: loss = loss_sum / max(normaliser, 1), and a distributed wrapper sums both
    over processes before dividing.
    """
    if reduction == "sum":
        return torch.ones((), dtype=torch.long, device=num_terms.device)
    return num_nonzero if reduction == "nonzero_mean" else num_terms
