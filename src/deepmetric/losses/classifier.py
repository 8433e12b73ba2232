"""What the proxy, centre and softmax-classifier losses share (SPEC §5).

These losses compare each embedding with learnable vectors kept per class (class weights,
proxies, centres) instead of with other embeddings. They share these conventions:

- Class vectors are `nn.Parameter`s of shape (num_classes, embedding_size): one row per
  class, as in `nn.Linear.weight` (pytorch-metric-learning stores the transpose, (D, C)).
  They are float32 master weights; give them their own learning rate with
  `deepmetric.losses.param_groups`.
- Labels are class indices 0 .. num_classes - 1 (a negative label or one >= num_classes is
  an error, not a silent out-of-range read).
- They are called like every loss, `loss_fn(embeddings, labels)`; `indices_tuple` and
  `ref_emb` have no meaning here (the "pairs" are sample-class pairs, all of which are used)
  and are rejected with an error that says so.
- They compute in float32 for float16 / bfloat16 inputs and under autocast (autocast is
  switched off inside the loss and the class vectors are cast to the compute dtype, never
  the embeddings down to half), in float64 for float64 inputs, and return the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from deepmetric._validation import check_positive
from deepmetric.distances import BaseDistance, CosineSimilarity, SquaredEuclideanDistance
from deepmetric.losses.base import LossInputs, MetricLoss, prepare_inputs
from deepmetric.losses.reduction import reduce_terms


def very_negative(dtype: torch.dtype) -> float:
    """A finite stand-in for -inf in masked log-sum-exps: exp() of it is exactly 0, but
    unlike -inf it never yields NaN gradients when a whole row is masked."""
    return torch.finfo(dtype).min / 4


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Switch autocast off, so the loss's matmuls run in the dtype of its inputs."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def check_count(value: int, name: str) -> int:
    """Return `value` if it is an integer >= 1; raise a ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_range(value: float, name: str, low: float, high: float, unit: str) -> float:
    """Return `value` if low <= value <= high; raise a ValueError naming the argument."""
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}] ({unit}), got {value}")
    return float(value)


def reject_mining_inputs(
    indices_tuple: tuple | None, ref_emb: Tensor | None, ref_labels: Tensor | None
) -> None:
    """Raise if a class-vector loss is given mined tuples or a reference set."""
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


def check_class_call(
    embeddings: Tensor,
    labels: Tensor | None,
    num_classes: int,
    embedding_size: int,
    *class_tensors: Tensor,
) -> LossInputs:
    """Check a call of a class-vector loss; return the inputs cast to the compute dtype.

    `class_tensors` (weights, proxies, centres) must be on the embeddings' device.
    """
    if labels is None:
        raise ValueError("labels are required: they say which class vector each row belongs to")
    inputs = prepare_inputs(embeddings, labels)
    if embeddings.shape[1] != embedding_size:
        raise ValueError(
            f"embeddings have {embeddings.shape[1]} features per row but the loss's class "
            f"vectors have embedding_size={embedding_size}; build the loss with "
            f"embedding_size={embeddings.shape[1]}"
        )
    for tensor in class_tensors:
        if tensor.device != embeddings.device:
            raise ValueError(
                f"embeddings are on {embeddings.device} but the loss's class vectors are on "
                f"{tensor.device}; move the loss with loss_fn.to(embeddings.device)"
            )
    check_class_labels(labels, num_classes)
    return inputs


def check_class_labels(labels: Tensor, num_classes: int) -> None:
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


def init_class_vectors(rows: int, embedding_size: int) -> nn.Parameter:
    """float32 (rows, embedding_size) parameter, entries N(0, 1 / embedding_size): rows of
    about unit norm, so unnormalised losses start with logits of order one."""
    return nn.Parameter(torch.randn(rows, embedding_size) / math.sqrt(embedding_size))


def cross_entropy_terms(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-row softmax cross-entropy -log softmax(logits)[label] (stable log-sum-exp)."""
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def reduce_rows(terms: Tensor, reduction: str, inputs: LossInputs) -> Tensor:
    """Reduce per-sample terms and return the loss in the input dtype."""
    return inputs.finish(reduce_terms(terms, reduction))


class ClassifierLoss(MetricLoss):
    """Base of the losses with learnable class vectors (proxies, class weights, centres).

    `distance` is the distance the trained embeddings should be compared with (cosine for
    the normalised softmax family), so evaluation code can read it from the loss.

    Args:
        num_classes: C, the number of classes; labels must lie in [0, C).
        embedding_size: D, the width of the embeddings.
        distance: the distance the loss uses between embeddings and class vectors.
        reduction: "mean", "nonzero_mean" or "sum" over the per-sample terms.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        distance: BaseDistance | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(distance, reduction)
        self.num_classes = check_count(num_classes, "num_classes")
        self.embedding_size = check_count(embedding_size, "embedding_size")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}"


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


def check_scale(value: float, name: str) -> float:
    """Return `value` as a float if it is > 0 (scales and temperatures)."""
    return float(check_positive(value, name))
