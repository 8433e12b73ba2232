"""What every embedding loss shares: the calling convention and input checks.

    loss = loss_fn(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)

`embeddings` (N, D) are the batch; `labels` (N,) their integer classes (any integers). With
`ref_emb` (M, D) and `ref_labels` (M,), positives and negatives are taken from that reference
set instead of the batch (cross-modal training, memory banks); anchors stay in the batch.
`indices_tuple` restricts the loss to mined triplets (a, p, n) or pairs (a1, p, a2, n).
Labels are class ids of any integer dtype or bool (used as int64). The keyword-only
`query_ids` (N,) and `ref_ids` (M,) name the item of each row: rows with equal ids are never
paired (`deepmetric.pairwise`); by default the batch as its own reference set excludes each
row against itself only.

Distributed local-anchor mode (`local_anchor_supported`): a loss whose value is a sum of
per-anchor terms divided by a count reports `loss_sum` and `normaliser` in its stats, with
loss = loss_sum / max(normaliser, 1), so that a wrapper can sum both over processes.

Losses compute in float32 when given float16 or bfloat16 inputs and return the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from deepmetric.distances import BaseDistance, EuclideanDistance
from deepmetric.losses.reduction import check_reduction
from deepmetric.pairwise import check_pair_batch
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
    ids: tuple[Tensor, Tensor] | None = None
    relevance: Tensor | None = None

    def finish(self, loss: Tensor) -> Tensor:
        """The loss returned to the user, in the input dtype; a ValueError when a loss computed
        in float32 for half-precision inputs does not fit in that dtype (never inf)."""
        if self.dtype != loss.dtype and self.dtype in (torch.float16, torch.bfloat16):
            largest = torch.finfo(self.dtype).max
            value = float(loss.detach().abs().max()) if loss.numel() else 0.0
            if math.isfinite(value) and value > largest:
                raise ValueError(
                    f"the loss ({value:.4g}, computed in float32) does not fit in "
                    f"{self.dtype} (largest {largest:.4g}); scale the embeddings down (e.g. "
                    "normalise them) or pass float32 embeddings"
                )
        return loss.to(self.dtype)


def prepare_inputs(
    embeddings: Tensor,
    labels: Tensor | None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> LossInputs:
    """Check a loss call's arguments once, with messages that name the argument and the fix.

    Labels come back as int64 class ids (N,) or bool label sets (N, L); `ids` holds the
    checked (query_ids, ref_ids) (see `deepmetric.pairwise.check_ids`); `relevance` (N, M),
    when given, decides the positive pairs instead of the labels (docs/labels.md).
    """
    batch, ids = check_pair_batch(
        embeddings,
        labels,
        ref_emb,
        ref_labels,
        labels_optional=indices_tuple is not None,
        query_ids=query_ids,
        ref_ids=ref_ids,
        relevance=relevance,
    )
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
        ids,
        relevance,
    )


class MetricLoss(nn.Module):
    """Base of the embedding losses: holds the distance and the reduction.

    A subclass names its functional form (`function = staticmethod(fn)`) and the attribute
    names of its hyper-parameters (`hyper_parameters`), declared with
    `deepmetric._validation.HyperParameter`; `forward` is then inherited. A loss that is
    already one number (a probability, a clustering score) sets `has_reduction = False`: its
    function takes no `reduction`. It says whether it can run in distributed local-anchor
    mode (`local_anchor_supported`).
    """

    local_anchor_supported: bool = False
    """Whether the loss is a sum of per-anchor terms over one count, reported as `loss_sum`
    and `normaliser` in its stats (distributed local-anchor mode); see `local_anchor_reason`."""
    local_anchor_reason: str = "it does not report loss_sum and normaliser in its stats"
    """Why local-anchor mode is refused, when `local_anchor_supported` is False."""
    function: ClassVar[Callable | None] = None
    """The loss function a subclass forwards to (as `staticmethod(fn)`), with the module's
    `hyper_parameters` (attribute names, the same as the function's keywords)."""
    hyper_parameters: ClassVar[tuple[str, ...]] = ()
    has_reduction: ClassVar[bool] = True
    """Whether `function` takes a `reduction` (the module's `reduction` is passed on)."""

    def __init__(self, distance: BaseDistance | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.distance = EuclideanDistance() if distance is None else distance
        self.reduction = check_reduction(reduction)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        **pairing: Tensor | None,
    ) -> Tensor:
        """`function(embeddings, labels, indices_tuple, ref_emb, ref_labels, **pairing)` with
        this module's hyper-parameters, distance and reduction; its stats in `self.stats`.
        `pairing`: the keyword-only `query_ids`, `ref_ids`, `relevance` (docs/labels.md)."""
        if self.function is None:
            raise NotImplementedError(f"{type(self).__name__} must define forward or function")
        values = {name: getattr(self, name) for name in self.hyper_parameters}
        return self.forward_with_stats(
            type(self).function,
            embeddings,
            labels,
            indices_tuple,
            ref_emb,
            ref_labels,
            **values,
            **pairing,
        )

    def forward_with_stats(self, function: Callable, *args, **hyper_parameters) -> Tensor:
        """Call a loss function with this module's distance and reduction (if the loss has
        one, `has_reduction`); keep its stats."""
        if self.has_reduction:
            hyper_parameters["reduction"] = self.reduction
        loss, self.stats = function(
            *args, distance=self.distance, return_stats=True, **hyper_parameters
        )
        return loss
