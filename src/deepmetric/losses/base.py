"""What every embedding loss shares: the calling convention and input checks.

    loss = loss_fn(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)

`embeddings` (N, D) are the batch; `labels` (N,) their integer classes (any integers). With
`ref_emb` (M, D) and `ref_labels` (M,), positives and negatives are taken from that reference
set instead of the batch (cross-modal training, memory banks); anchors stay in the batch.
`indices_tuple` restricts the loss to mined triplets (a, p, n) or pairs (a1, p, a2, n).

Losses compute in float32 when given float16 or bfloat16 inputs and return the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from deepmetric._validation import check_batch
from deepmetric.distances import BaseDistance, EuclideanDistance
from deepmetric.losses.reduction import check_reduction
from deepmetric.tuples import check_indices_tuple, reference_key


class LossInputs(NamedTuple):
    """Checked inputs of a loss call, cast to the dtype the loss computes in."""

    embeddings: Tensor
    labels: Tensor | None
    ref_emb: Tensor
    ref_labels: Tensor | None
    ref_is_query: bool
    indices_tuple: tuple[Tensor, ...] | None
    dtype: torch.dtype

    def finish(self, loss: Tensor) -> Tensor:
        """The loss returned to the user, in the input dtype."""
        return loss.to(self.dtype)


def prepare_inputs(
    embeddings: Tensor,
    labels: Tensor | None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
) -> LossInputs:
    """Check a loss call's arguments once, with messages that name the argument and the fix."""
    batch = check_batch(embeddings, labels, ref_emb, ref_labels, indices_tuple is not None)
    if indices_tuple is not None:
        indices_tuple = check_indices_tuple(
            indices_tuple, len(batch.embeddings), len(batch.ref_emb), reference_key(ref_emb)
        )
    return LossInputs(
        batch.embeddings,
        batch.labels,
        batch.ref_emb,
        batch.ref_labels,
        batch.ref_is_query,
        indices_tuple,
        batch.dtype,
    )


class MetricLoss(nn.Module):
    """Base of the embedding losses: holds the distance and the reduction.

    Subclasses implement `forward(embeddings, labels, indices_tuple=None, ref_emb=None,
    ref_labels=None)` by calling their functional form.
    """

    def __init__(self, distance: BaseDistance | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.distance = EuclideanDistance() if distance is None else distance
        self.reduction = check_reduction(reduction)

    def forward_with_stats(self, function: Callable, *args, **hyper_parameters) -> Tensor:
        """Call a loss function with this module's distance and reduction; keep its stats."""
        loss, self.stats = function(
            *args,
            distance=self.distance,
            reduction=self.reduction,
            return_stats=True,
            **hyper_parameters,
        )
        return loss
