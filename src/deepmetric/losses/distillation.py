"""Knowledge distillation with temperature (Hinton et al. 2015; survey eq. 18), for
classifier logits and for embeddings (SPEC §5).

A student is trained to match the teacher's softened distribution p = softmax(t / T),
either over classes (logits) or over a reference set (each row's similarities to the other
embeddings, a relational form for embedding students whose width differs from the
teacher's). The teacher gets no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric._validation import (
    HyperParameter,
    check_embeddings,
    check_labels,
    check_positive,
    check_range,
    check_same_device,
    compute_dtype,
)
from deepmetric.distances import BaseDistance, CosineSimilarity
from deepmetric.losses.base import any_distance, checked
from deepmetric.losses.classifier import (
    ClassifierStats,
    full_precision,
    reduce_rows,
    very_negative,
)
from deepmetric.losses.reduction import check_reduction

check_weight = check_range(0, 1, "a weight")


def _soft_kl(
    student: Tensor, teacher: Tensor, temperature: float, leave_out: Tensor | None = None
) -> Tensor:
    """Per-row T^2 KL(softmax(teacher / T) || softmax(student / T)); entries where
    `leave_out` is True are left out of both distributions."""
    student, teacher = student / temperature, teacher.detach() / temperature
    if leave_out is not None:
        student = student.masked_fill(leave_out, very_negative(student.dtype))
        teacher = teacher.masked_fill(leave_out, very_negative(teacher.dtype))
    log_q = F.log_softmax(student, dim=1)
    log_p = F.log_softmax(teacher, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)
    return temperature**2 * kl


def _reject_tuples(indices_tuple: object, ref_labels: object) -> None:
    if indices_tuple is not None or ref_labels is not None:
        raise ValueError(
            "distillation uses no indices_tuple or ref_labels: every row is matched to the "
            "teacher's row; call it without a miner"
        )


@checked(temperature=check_positive, hard_label_weight=check_weight)
def distillation_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    hard_label_weight: float = 0.0,
    reduction: str = "mean",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, ClassifierStats]:
    """Distillation with temperature (Hinton et al. 2015; survey eq. 18).

        L = (1 - w) T^2 sum_i p_i log(p_i / q_i) + w CE(z_s, y),
        p = softmax(z_t / T), q = softmax(z_s / T)

    The soft term is the survey's cross-entropy -sum p_i log q_i minus the teacher's entropy,
    which does not depend on the student: same gradient, and 0 when the student matches.
    T^2 keeps the soft gradients' size independent of T (Hinton et al.). The teacher is
    detached.

    Args:
        embeddings: (N, C) the student's logits; labels: (N,) class indices, needed when
            hard_label_weight > 0.
        teacher_logits: (N, C) logits of the same classes, keyword-only.
        temperature: T > 0 (dimensionless; T = 1 is the plain softmax, T > 1 softens).
        hard_label_weight: w in [0, 1], the weight of the ordinary cross-entropy at T = 1.
        reduction: "mean", "nonzero_mean" or "sum" over rows.
        return_stats: also return a `ClassifierStats`.

    Example:
        >>> z_s, z_t = torch.randn(8, 5), torch.randn(8, 5)
        >>> distillation_loss(z_s, teacher_logits=z_t, temperature=4.0) >= 0
        tensor(True)
    """
    _reject_tuples(indices_tuple, ref_labels)
    if ref_emb is not None:
        raise ValueError("ref_emb applies to similarity distillation only, not to logits")
    check_embeddings(embeddings)
    check_embeddings(teacher_logits, "teacher_logits")
    check_same_device(embeddings=embeddings, teacher_logits=teacher_logits)
    if teacher_logits.shape != embeddings.shape:
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher_logits.shape)} but the student's logits "
            f"(embeddings) have {tuple(embeddings.shape)}; both must score the same N rows over "
            "the same C classes"
        )
    if labels is not None:
        labels = check_labels(labels, len(embeddings)).long()
    elif hard_label_weight > 0:
        raise ValueError("hard_label_weight > 0 needs labels")
    dtype = embeddings.dtype
    with full_precision(embeddings.device):
        student = embeddings.to(compute_dtype(dtype))
        terms = _soft_kl(student, teacher_logits.to(student.dtype), temperature)
        if hard_label_weight > 0:
            hard = F.cross_entropy(student, labels, reduction="none")
            terms = (1 - hard_label_weight) * terms + hard_label_weight * hard
        return reduce_rows(terms, dtype, reduction, return_stats)


@checked(any_distance(CosineSimilarity), temperature=check_positive)
def similarity_distillation_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    teacher_emb: Tensor,
    teacher_ref_emb: Tensor | None = None,
    temperature: float = 0.1,
    distance: BaseDistance | None = None,
    teacher_distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, ClassifierStats]:
    """Distillation of similarities: each row's softened distribution over a reference set
    (Hinton et al. 2015's soft targets, applied to the (N, M) similarity matrix).

        L_i = T^2 KL( softmax_j(s_t(i, j) / T) || softmax_j(s_s(i, j) / T) )

    s_s between the student's embeddings and its reference set, s_t between the teacher's
    (rows aligned: row i of both is the same item). A distance is negated into a similarity.
    Without a reference set the batch is its own and the pair (i, i) is left out of both
    rows. Student and teacher may have different widths.

    Args:
        embeddings: (N, D) student; labels: not used (the teacher gives the targets), but
            checked when given.
        ref_emb: (M, D) the student's reference set, with teacher_ref_emb or neither.
        teacher_emb: (N, D') teacher, same items; teacher_ref_emb: (M, D') (keyword-only).
        temperature: T > 0, in the similarity's units (0.1 suits cosine similarities).
        distance: the student's `BaseDistance` (default cosine similarity);
            teacher_distance: the teacher's (default: the student's).
        reduction: "mean", "nonzero_mean" or "sum" over rows.
        return_stats: also return a `ClassifierStats`.

    Example:
        >>> student, teacher = torch.randn(8, 4), torch.randn(8, 16)
        >>> similarity_distillation_loss(student, teacher_emb=teacher, temperature=0.1) >= 0
        tensor(True)
    """
    _reject_tuples(indices_tuple, ref_labels)
    if labels is not None:
        check_labels(labels, len(embeddings))
    teacher_distance = distance if teacher_distance is None else teacher_distance
    _check_similarity_inputs(embeddings, ref_emb, teacher_emb, teacher_ref_emb)
    dtype = embeddings.dtype
    with full_precision(embeddings.device):
        x = embeddings.to(compute_dtype(dtype))
        ref = x if ref_emb is None else ref_emb.to(x.dtype)
        teacher = teacher_emb.detach().to(x.dtype)
        teacher_ref = teacher if teacher_ref_emb is None else teacher_ref_emb.detach().to(x.dtype)
        student_sim = distance.as_similarity(distance(x, ref))
        teacher_sim = teacher_distance.as_similarity(teacher_distance(teacher, teacher_ref))
        leave_out = None
        if ref_emb is None:
            leave_out = torch.eye(len(x), dtype=torch.bool, device=x.device)
        if ref_emb is None and len(x) == 1:  # no other row to compare with
            terms = student_sim.sum(dim=1) * 0
        else:
            terms = _soft_kl(student_sim, teacher_sim, temperature, leave_out)
        return reduce_rows(terms, dtype, reduction, return_stats)


def _check_similarity_inputs(embeddings, ref_emb, teacher_emb, teacher_ref_emb) -> None:
    if (ref_emb is None) != (teacher_ref_emb is None):
        raise ValueError("pass both ref_emb and teacher_ref_emb, or neither")
    check_embeddings(embeddings)
    check_embeddings(teacher_emb, "teacher_emb")
    check_same_device(
        embeddings=embeddings,
        teacher_emb=teacher_emb,
        ref_emb=ref_emb,
        teacher_ref_emb=teacher_ref_emb,
    )
    if len(teacher_emb) != len(embeddings):
        raise ValueError(
            f"teacher_emb has {len(teacher_emb)} rows but embeddings has {len(embeddings)}; "
            "row i of both must be the same item"
        )
    if ref_emb is not None:
        check_embeddings(ref_emb, "ref_emb")
        check_embeddings(teacher_ref_emb, "teacher_ref_emb")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb has {ref_emb.shape[1]} features per row but embeddings has "
                f"{embeddings.shape[1]}; both come from the student"
            )
        if len(teacher_ref_emb) != len(ref_emb):
            raise ValueError(
                f"teacher_ref_emb has {len(teacher_ref_emb)} rows but ref_emb has "
                f"{len(ref_emb)}; row j of both must be the same item"
            )


def _check_optional_distance(value: object, name: str) -> BaseDistance | None:
    if value is not None and not isinstance(value, BaseDistance):
        raise TypeError(f"{name} must be a deepmetric distance or None, got {value!r}")
    return value


class DistillationLoss(nn.Module):
    """Distillation with temperature (Hinton et al. 2015); see `distillation_loss` (logits,
    `distance=None`) and `similarity_distillation_loss` (embeddings, with a distance).

    Called like every loss, with the teacher's outputs as keyword arguments:

        loss = loss_fn(student_out, labels, teacher_emb=teacher_out)                  # logits
        loss = loss_fn(student_emb, teacher_emb=teacher_emb, ref_emb=r, teacher_ref_emb=tr)

    `stats` holds the `ClassifierStats` of the last call (loss == loss_sum / normaliser).

    Args:
        temperature: T > 0 (default 4.0, for logits).
        distance: None for logits; a `BaseDistance` to distil similarities of embeddings.
        teacher_distance: the teacher's distance in similarity mode (default `distance`).
        hard_label_weight: w in [0, 1] (logits only): weight of the plain cross-entropy.
        reduction: "mean", "nonzero_mean" or "sum" over rows.

    Example:
        >>> loss_fn = DistillationLoss(temperature=4.0)
        >>> loss = loss_fn(torch.randn(8, 5), teacher_emb=torch.randn(8, 5))
        >>> loss_fn.stats.num_terms
        8
    """

    local_anchor_supported = False
    local_anchor_reason = (
        "the teacher's outputs are keyword arguments (teacher_emb) that a distributed "
        "wrapper does not gather or split; compute it on each rank's rows and average"
    )
    temperature = HyperParameter(distillation_loss.checks["temperature"])
    hard_label_weight = HyperParameter(distillation_loss.checks["hard_label_weight"])
    reduction = HyperParameter(lambda value, name: check_reduction(value))

    def __init__(
        self,
        temperature: float = 4.0,
        distance: BaseDistance | None = None,
        teacher_distance: BaseDistance | None = None,
        hard_label_weight: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.temperature, self.hard_label_weight = temperature, hard_label_weight
        self.distance = _check_optional_distance(distance, "distance")
        self.teacher_distance = _check_optional_distance(teacher_distance, "teacher_distance")
        if distance is not None and self.hard_label_weight > 0:
            raise ValueError("hard_label_weight applies to logits only (distance=None)")
        self.reduction = reduction
        self.stats: ClassifierStats | None = None

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        teacher_emb: Tensor,
        teacher_ref_emb: Tensor | None = None,
    ) -> Tensor:
        if self.distance is None:
            if teacher_ref_emb is not None:
                raise ValueError("ref_emb / teacher_ref_emb apply to similarity mode only")
            function = distillation_loss
            teacher = {"teacher_logits": teacher_emb, "hard_label_weight": self.hard_label_weight}
        else:
            function = similarity_distillation_loss
            teacher = {
                "teacher_emb": teacher_emb,
                "teacher_ref_emb": teacher_ref_emb,
                "distance": self.distance,
                "teacher_distance": self.teacher_distance,
            }
        loss, self.stats = function(
            embeddings,
            labels,
            indices_tuple,
            ref_emb,
            ref_labels,
            temperature=self.temperature,
            reduction=self.reduction,
            return_stats=True,
            **teacher,
        )
        return loss

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, distance={self.distance}, "
            f"hard_label_weight={self.hard_label_weight}"
        )
