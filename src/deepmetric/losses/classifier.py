"""What the proxy, centre and softmax-classifier losses share (SPEC §5).

These losses compare each embedding with learnable vectors kept per class (class weights,
proxies, centres) instead of with other embeddings. They share these conventions:

- One functional signature, the one of every loss family:

      loss = fn(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                <class vectors>, <hyper-parameters>, distance=None, reduction="mean",
                return_stats=False)

  The class vectors (`weight`, `proxies`, `centers`) are keyword-only. `indices_tuple` and
  `ref_emb` / `ref_labels` have no meaning here (the "pairs" are sample-class pairs, all of
  which are used) and are rejected with an error that says so.
- Class vectors are `nn.Parameter`s of shape (num_classes, embedding_size): one row per
  class, as in `nn.Linear.weight` (pytorch-metric-learning stores the transpose, (D, C)).
  They are float32 master weights; give them their own learning rate with
  `deepmetric.losses.param_groups`. The width is called `embedding_size` as in
  pytorch-metric-learning, so its proxy and softmax losses build the same way here.
- Labels are class indices 0 .. num_classes - 1 of any integer dtype or bool (a negative
  label or one >= num_classes is an error, not a silent out-of-range read).
- They compute in float32 for float16 / bfloat16 inputs and under autocast (autocast is
  switched off inside the loss and the class vectors are cast to the compute dtype, never
  the embeddings down to half), in float64 for float64 inputs, and return the input dtype;
  a loss too large for that dtype raises an error instead of returning inf.
- Features and class vectors are normalised, where a loss does, by
  `deepmetric.distances.safe_normalize`: the values of `F.normalize`, and an all-zero row
  passes no gradient (F.normalize would pass 1 / eps = 1e12 times the incoming one).
- With `return_stats=True` they also return a `ClassifierStats` (`loss_sum`, `normaliser`:
  loss == loss_sum / normaliser, so a distributed wrapper can sum both over ranks); the
  modules keep it in `stats`.

Thin by construction (`deepmetric.losses.base.checked` and `MetricLoss`): each
hyper-parameter is declared once, on the function, by `@checked(<distance rule>, name=<check>,
...)`. A `ClassifierLoss` subclass names its function and its class vectors:

    class CosFaceLoss(ClassifierLoss):
        function = staticmethod(cosface_loss)
        class_vectors = ("weight",)

and gets the constructor `(num_classes, embedding_size, <the function's hyper-parameters and
defaults>, distance=None, reduction="mean")`, which stores them and makes the class vectors.
A module whose constructor differs from its function (a schedule, a buffer, a flag) writes
its own `__init__`; the call, the stats and the repr come from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric._validation import (
    HyperParameter,
    check_batch,
    check_count,
    check_labels,
)
from deepmetric.distances import (
    BaseDistance,
    CosineSimilarity,
    SquaredEuclideanDistance,
    safe_normalize,
)
from deepmetric.losses.base import DistanceRule, MetricLoss

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def very_negative(dtype: torch.dtype) -> float:
    """A finite stand-in for -inf in masked log-sum-exps: exp() of it is exactly 0, but
    unlike -inf it never yields NaN gradients when a whole row is masked."""
    return torch.finfo(dtype).min / 4


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Switch autocast off, so the loss's matmuls run in the dtype of its inputs."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


# ---------------------------------------------------------------- which distance a loss takes


COSINE = DistanceRule(
    CosineSimilarity,
    lambda d: isinstance(d, CosineSimilarity),
    "the cosine similarity (its margins and scales are in cosine units)",
)
NOT_SIMILARITY = DistanceRule(
    SquaredEuclideanDistance,
    lambda d: not d.is_inverted,
    "a distance (smaller is closer), not a similarity",
)


def cosine_coefficient(distance: BaseDistance, scale: float) -> float | None:
    """c such that -scale d(x, p) = c cos(x, p) + (a constant), or None.

    Softmax-type losses do not change when all logits of a row move by one constant, so
    for these distances one matmul of unit vectors gives the logits: for unit vectors the
    squared Euclidean distance is 2 - 2 cos (survey eq. 16)."""
    if type(distance) is CosineSimilarity:
        return scale
    if type(distance) is SquaredEuclideanDistance and distance.normalize_embeddings:
        return 2 * scale
    return None


class ClassBatch(NamedTuple):
    """A checked call of a class-vector loss: embeddings cast to the compute dtype, labels
    as int64 class indices, and the input dtype the loss is returned in."""

    embeddings: Tensor
    labels: Tensor
    dtype: torch.dtype

    def cast(self, vectors: Tensor) -> Tensor:
        """Class vectors in the compute dtype."""
        return vectors.to(self.embeddings.dtype)


def check_class_batch(
    embeddings: Tensor,
    labels: Tensor | None,
    indices_tuple: object,
    ref_emb: object,
    ref_labels: object,
    num_classes: int,
    **vectors: Tensor,
) -> ClassBatch:
    """Check a call of a class-vector loss once; `vectors` are its class vectors by name
    (each (rows, D), or (rows,) for a bias), on the embeddings' device."""
    _reject_mining_inputs(indices_tuple, ref_emb, ref_labels, vectors)
    if labels is None:
        raise ValueError("labels are required: they say which class vector each row belongs to")
    batch = check_batch(embeddings, labels)
    for name, tensor in vectors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() == 2 and tensor.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"embeddings have {embeddings.shape[1]} features per row but the loss's class "
                f"vectors ({name}) have embedding_size={tensor.shape[1]}; build the loss with "
                f"embedding_size={embeddings.shape[1]}"
            )
        if tensor.device != embeddings.device:
            raise ValueError(
                f"embeddings are on {embeddings.device} but the loss's {name} is on "
                f"{tensor.device}; move the loss with loss_fn.to(embeddings.device)"
            )
    labels = labels.long()
    _check_class_labels(labels, num_classes)
    return ClassBatch(batch.embeddings, labels, batch.dtype)


def _reject_mining_inputs(
    indices_tuple: object, ref_emb: object, ref_labels: object, vectors: dict[str, Tensor]
) -> None:
    if isinstance(indices_tuple, Tensor):
        keywords = ", ".join(f"{name}=..." for name in vectors)
        raise TypeError(
            "a Tensor was passed third, where indices_tuple goes: the class vectors are "
            f"keyword-only, call the loss as fn(embeddings, labels, {keywords})"
        )
    if indices_tuple is not None:
        raise ValueError(
            "indices_tuple is not used by proxy and classifier losses: every sample is compared "
            "with every class vector, so there is nothing to mine; call the loss without a miner"
        )
    if ref_emb is not None or ref_labels is not None:
        raise ValueError(
            "ref_emb / ref_labels are not used by proxy and classifier losses: the reference "
            "set is the learned class vectors; call the loss with embeddings and labels only"
        )


def _check_class_labels(labels: Tensor, num_classes: int) -> None:
    """Raise unless every label is a class index in [0, num_classes)."""
    low, high = (int(v) for v in torch.stack([labels.min(), labels.max()]).tolist())
    if low < 0:
        raise ValueError(
            f"labels must be class indices in [0, num_classes), got the label {low}; map them "
            "to 0..C-1 first, e.g. labels = torch.unique(labels, return_inverse=True)[1]"
        )
    if high >= num_classes:
        raise ValueError(
            f"num_classes={num_classes} is too small: labels go up to {high}; build the loss "
            f"with num_classes >= {high + 1}"
        )


# ---------------------------------------------------------------- shared arithmetic


def init_class_vectors(rows: int, embedding_size: int) -> nn.Parameter:
    """float32 (rows, embedding_size) parameter, entries N(0, 1 / embedding_size): rows of
    about unit norm, so unnormalised losses start with logits of order one."""
    return nn.Parameter(torch.randn(rows, embedding_size) / math.sqrt(embedding_size))


def cosine_logits(
    x: Tensor, vectors: Tensor, coefficient: float, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """(coefficient cos(x_i, v_j)) for all i, j (N, R), and cos(x_i, v_{rows_i}) with the
    same rows (`rows` (N,) or (k, N)), computed per row. An all-zero row is the zero vector
    with no gradient (`deepmetric.distances.safe_normalize`, the library's policy)."""
    unit_x, unit_v = safe_normalize(x), safe_normalize(vectors)
    logits = (unit_x * coefficient) @ unit_v.T
    return logits, (unit_x * unit_v[rows]).sum(dim=-1)


def cross_entropy_terms(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-row softmax cross-entropy -log softmax(logits)[label] (stable log-sum-exp)."""
    return F.cross_entropy(logits, labels, reduction="none")


def with_target(logits: Tensor, labels: Tensor, target: Tensor) -> Tensor:
    """`logits` with the true-class column replaced by `target` (in place: callers pass a
    matmul output that backward does not need)."""
    return logits.scatter_(1, labels.unsqueeze(1), target.reshape(-1, 1))


# ---------------------------------------------------------------- reduction and stats


@dataclass(frozen=True)
class ClassifierStats:
    """What a class-vector loss call reports: `loss == loss_sum / normaliser`.

    loss_sum: the sum of the per-row terms (with grad, in the compute dtype).
    normaliser: the divisor the reduction used (N for "mean", the number of non-zero terms
        for "nonzero_mean", 1 for "sum").
    num_terms: the number of terms (rows, or proxies for Proxy-Anchor's parts).
    num_active: the number of terms > 0 (a 0-dim tensor).
    """

    loss_sum: Tensor
    normaliser: Tensor
    num_terms: int
    num_active: Tensor


def sum_terms(terms: Tensor, reduction: str, mask: Tensor | None = None) -> ClassifierStats:
    """The sum of `terms` (only where `mask`) and the divisor of `reduction`."""
    if mask is not None:
        terms = terms * mask
    total = terms.sum()
    with torch.no_grad():
        num_active = (terms > 0).sum()
        num_terms = len(terms) if mask is None else int(mask.sum())
    if reduction == "sum":
        normaliser = total.new_ones(())
    elif reduction == "nonzero_mean":
        normaliser = num_active.clamp_min(1).to(total.dtype)
    else:
        normaliser = total.new_tensor(float(max(num_terms, 1)))
    return ClassifierStats(total, normaliser, num_terms, num_active)


def finish(loss: Tensor, dtype: torch.dtype) -> Tensor:
    """The loss in the input dtype; raise instead of returning inf from a half-precision cast."""
    out = loss.to(dtype)
    if dtype in _HALF_DTYPES and not bool(torch.isfinite(out)) and bool(torch.isfinite(loss)):
        raise ValueError(
            f"the loss is {float(loss.detach()):.6g}, which {dtype} (the dtype of embeddings) "
            f"cannot represent (largest {torch.finfo(dtype).max:.6g}); pass embeddings.float(), or "
            "lower the loss scale (center_weight, scale, input magnitude)"
        )
    return out


def reduce_rows(
    terms: Tensor, dtype: torch.dtype, reduction: str, return_stats: bool
) -> Tensor | tuple[Tensor, ClassifierStats]:
    """Reduce per-row terms; the loss in `dtype` (the input's), and its stats if asked."""
    stats = sum_terms(terms, reduction)
    loss = finish(stats.loss_sum / stats.normaliser, dtype)
    return (loss, stats) if return_stats else loss


# ---------------------------------------------------------------- modules


def _check_ids(query_ids: object, ref_ids: object, embeddings: Tensor) -> None:
    """Item ids, accepted like every loss's: rows are never paired with each other here (each
    is compared with the class vectors only), so `query_ids` is checked and has no effect."""
    if ref_ids is not None:
        raise ValueError(
            "ref_ids is not used by proxy and classifier losses: they have no reference rows "
            "(the reference set is the learned class vectors); leave it out"
        )
    if query_ids is not None and isinstance(embeddings, Tensor):
        check_labels(query_ids, len(embeddings), "query_ids")


class ClassifierLoss(MetricLoss):
    """Base of the losses with learnable class vectors (proxies, class weights, centres).

    A subclass sets `function` (its functional form, decorated with `checked`) and
    `class_vectors` (the names of its tensors that the function takes by keyword); the rest
    comes from `MetricLoss`, with `num_classes` and `embedding_size` leading the generated
    constructor, whose `init_state` makes each class vector with `class_vector_rows()` rows.
    Each call also passes the class vectors; `update` runs after each training-mode call
    (schedules, centre updates). The call takes the keyword-only `query_ids` of every loss
    (checked; no effect, since rows are compared with class vectors, never with each other).

    Args:
        num_classes: C, the number of classes; labels must lie in [0, C).
        embedding_size: D, the width of the embeddings.
        distance: the distance between embeddings and class vectors (None: the loss's own).
        reduction: "mean", "nonzero_mean" or "sum" over the per-sample terms.
    """

    class_vectors: ClassVar[tuple[str, ...]] = ()
    distances: ClassVar[DistanceRule] = COSINE
    local_anchor_supported: ClassVar[bool] = True

    num_classes = HyperParameter(check_count)
    embedding_size = HyperParameter(check_count)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        distance: BaseDistance | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(distance, reduction)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.stats: ClassifierStats | None = None

    def class_vector_rows(self) -> int:
        """The rows of each class vector the constructor makes: one per class."""
        return self.num_classes

    def init_state(self) -> None:
        """Make each class vector (`init_class_vectors`)."""
        for name in self.class_vectors:
            setattr(self, name, init_class_vectors(self.class_vector_rows(), self.embedding_size))

    def function_arguments(self) -> dict[str, Any]:
        """The keyword arguments of `function` for the next call, class vectors included."""
        vectors = {name: getattr(self, name) for name in self.class_vectors}
        return {**vectors, **super().function_arguments()}

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        query_ids: Tensor | None = None,
        ref_ids: Tensor | None = None,
    ) -> Tensor:
        _check_ids(query_ids, ref_ids, embeddings)
        loss = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if self.training:
            self.update(embeddings.detach(), labels)
        return loss

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        """What a training-mode call changes after the loss (nothing by default)."""
