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
    check_embeddings,
    check_labels,
    check_same_device,
    compute_dtype,
)
from deepmetric.distances import BaseDistance, CosineSimilarity
from deepmetric.losses.classifier import check_range, check_scale, full_precision, very_negative
from deepmetric.losses.reduction import check_reduction, reduce_terms


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


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 4.0,
    hard_label_weight: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Distillation with temperature (Hinton et al. 2015; survey eq. 18).

        L = (1 - w) T^2 sum_i p_i log(p_i / q_i) + w CE(z_s, y),
        p = softmax(z_t / T), q = softmax(z_s / T)

    The soft term is the survey's cross-entropy -sum p_i log q_i minus the teacher's entropy,
    which does not depend on the student: same gradient, and 0 when the student matches.
    T^2 keeps the soft gradients' size independent of T (Hinton et al.). The teacher is
    detached.

    Args:
        student_logits, teacher_logits: (N, C) logits of the same classes.
        labels: (N,) class indices, needed when hard_label_weight > 0.
        temperature: T > 0 (dimensionless; T = 1 is the plain softmax, T > 1 softens).
        hard_label_weight: w in [0, 1], the weight of the ordinary cross-entropy at T = 1.
        reduction: "mean", "nonzero_mean" or "sum" over rows.

    Example:
        >>> z_s, z_t = torch.randn(8, 5), torch.randn(8, 5)
        >>> distillation_loss(z_s, z_t, temperature=4.0) >= 0
        tensor(True)
    """
    check_reduction(reduction)
    temperature = check_scale(temperature, "temperature")
    hard_label_weight = check_range(hard_label_weight, "hard_label_weight", 0, 1, "a weight")
    check_embeddings(student_logits, "student_logits")
    check_embeddings(teacher_logits, "teacher_logits")
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher_logits.shape)} but student_logits has "
            f"{tuple(student_logits.shape)}; both must score the same N rows over the same C "
            "classes"
        )
    if hard_label_weight > 0:
        if labels is None:
            raise ValueError("hard_label_weight > 0 needs labels")
        check_labels(labels, len(student_logits), rows_name="student_logits")
    dtype = student_logits.dtype
    with full_precision(student_logits.device):
        student = student_logits.to(compute_dtype(dtype))
        terms = _soft_kl(student, teacher_logits.to(student.dtype), temperature)
        if hard_label_weight > 0:
            hard = F.cross_entropy(student, labels, reduction="none")
            terms = (1 - hard_label_weight) * terms + hard_label_weight * hard
        loss = reduce_terms(terms, reduction)
    return loss.to(dtype)


def similarity_distillation_loss(
    embeddings: Tensor,
    teacher_emb: Tensor,
    ref_emb: Tensor | None = None,
    teacher_ref_emb: Tensor | None = None,
    *,
    temperature: float = 0.1,
    distance: BaseDistance | None = None,
    teacher_distance: BaseDistance | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Distillation of similarities: each row's softened distribution over a reference set
    (Hinton et al. 2015's soft targets, applied to the (N, M) similarity matrix).

        L_i = T^2 KL( softmax_j(s_t(i, j) / T) || softmax_j(s_s(i, j) / T) )

    s_s between the student's embeddings and its reference set, s_t between the teacher's
    (rows aligned: row i of both is the same item). A distance is negated into a similarity.
    Without a reference set the batch is its own and the pair (i, i) is left out of both
    rows. Student and teacher may have different widths.

    Args:
        embeddings: (N, D) student; teacher_emb: (N, D') teacher, same items.
        ref_emb, teacher_ref_emb: (M, D) and (M, D') reference sets, both or neither.
        temperature: T > 0, in the similarity's units (0.1 suits cosine similarities).
        distance: the student's `BaseDistance` (default cosine similarity);
            teacher_distance: the teacher's (default: the student's).
        reduction: "mean", "nonzero_mean" or "sum" over rows.

    Example:
        >>> student, teacher = torch.randn(8, 4), torch.randn(8, 16)
        >>> similarity_distillation_loss(student, teacher, temperature=0.1) >= 0
        tensor(True)
    """
    distance = CosineSimilarity() if distance is None else distance
    teacher_distance = distance if teacher_distance is None else teacher_distance
    check_reduction(reduction)
    temperature = check_scale(temperature, "temperature")
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
    dtype = embeddings.dtype
    with full_precision(embeddings.device):
        x = embeddings.to(compute_dtype(dtype))
        ref = x if ref_emb is None else ref_emb.to(x.dtype)
        teacher = teacher_emb.detach().to(x.dtype)
        teacher_ref = teacher if teacher_ref_emb is None else teacher_ref_emb.detach().to(x.dtype)
        student_sim = -distance.as_dissimilarity(distance(x, ref))
        teacher_sim = -teacher_distance.as_dissimilarity(teacher_distance(teacher, teacher_ref))
        leave_out = None
        if ref_emb is None:
            if len(x) == 1:
                return (student_sim.sum() * 0).to(dtype)
            leave_out = torch.eye(len(x), dtype=torch.bool, device=x.device)
        terms = _soft_kl(student_sim, teacher_sim, temperature, leave_out)
        loss = reduce_terms(terms, reduction)
    return loss.to(dtype)


class DistillationLoss(nn.Module):
    """Distillation with temperature (Hinton et al. 2015); see `distillation_loss` (logits,
    `distance=None`) and `similarity_distillation_loss` (embeddings, with a distance).

    Called like every loss, with the teacher's outputs as keyword arguments:

        loss = loss_fn(student_out, labels, teacher_emb=teacher_out)                  # logits
        loss = loss_fn(student_emb, teacher_emb=teacher_emb, ref_emb=r, teacher_ref_emb=tr)

    Args:
        temperature: T > 0 (default 4.0, for logits).
        distance: None for logits; a `BaseDistance` to distil similarities of embeddings.
        teacher_distance: the teacher's distance in similarity mode (default `distance`).
        hard_label_weight: w in [0, 1] (logits only): weight of the plain cross-entropy.
        reduction: "mean", "nonzero_mean" or "sum" over rows.

    Example:
        >>> loss_fn = DistillationLoss(temperature=4.0)
        >>> loss = loss_fn(torch.randn(8, 5), teacher_emb=torch.randn(8, 5))
    """

    def __init__(
        self,
        temperature: float = 4.0,
        distance: BaseDistance | None = None,
        teacher_distance: BaseDistance | None = None,
        hard_label_weight: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.temperature = check_scale(temperature, "temperature")
        self.distance, self.teacher_distance = distance, teacher_distance
        self.hard_label_weight = check_range(
            hard_label_weight, "hard_label_weight", 0, 1, "a weight"
        )
        if distance is not None and self.hard_label_weight > 0:
            raise ValueError("hard_label_weight applies to logits only (distance=None)")
        self.reduction = check_reduction(reduction)

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
        if indices_tuple is not None or ref_labels is not None:
            raise ValueError(
                "DistillationLoss uses no indices_tuple or ref_labels: every row is matched to "
                "the teacher's row; call it without a miner"
            )
        if self.distance is None:
            if ref_emb is not None or teacher_ref_emb is not None:
                raise ValueError("ref_emb / teacher_ref_emb apply to similarity mode only")
            return distillation_loss(
                embeddings,
                teacher_emb,
                labels,
                temperature=self.temperature,
                hard_label_weight=self.hard_label_weight,
                reduction=self.reduction,
            )
        return similarity_distillation_loss(
            embeddings,
            teacher_emb,
            ref_emb,
            teacher_ref_emb,
            temperature=self.temperature,
            distance=self.distance,
            teacher_distance=self.teacher_distance,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, distance={self.distance}, "
            f"hard_label_weight={self.hard_label_weight}"
        )
