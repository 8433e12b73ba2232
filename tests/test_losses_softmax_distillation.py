"""Distillation with temperature against slow from-the-formula references (float64, loops
over rows and classes): logits (survey eq. 18) and similarity rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepmetric.distances import CosineSimilarity, EuclideanDistance
from deepmetric.losses.distillation import (
    DistillationLoss,
    distillation_loss,
    similarity_distillation_loss,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def softmax_ref(values, temperature):
    exps = [torch.exp(v / temperature) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def kl_rows_ref(student_rows, teacher_rows, temperature, reduction="mean"):
    """T^2 sum_j p_j log(p_j / q_j) per row, p from the teacher, q from the student."""
    terms = []
    for s_row, t_row in zip(student_rows, teacher_rows, strict=True):
        q = softmax_ref(s_row, temperature)
        p = softmax_ref([v.detach() for v in t_row], temperature)
        terms.append(
            temperature**2 * sum(pj * torch.log(pj / qj) for pj, qj in zip(p, q, strict=True))
        )
    total = sum(terms)
    return total if reduction == "sum" else total / len(terms)


def cosine(a, b):
    return sum(a[k] * b[k] for k in range(len(a))) / (
        torch.sqrt(sum(v * v for v in a)) * torch.sqrt(sum(v * v for v in b))
    )


def assert_same(fast, slow, inputs):
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-11)
    fast_grads = torch.autograd.grad(fast, inputs, retain_graph=True)
    slow_grads = torch.autograd.grad(slow, inputs)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def logits(seed, n=6, c=5):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = (3 * torch.randn(n, c, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, c, (n,), generator=g)
    return student, teacher, labels


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_logit_distillation_matches_reference(seed, temperature, reduction):
    student, teacher, _ = logits(seed)
    fast = distillation_loss(
        student, teacher_logits=teacher, temperature=temperature, reduction=reduction
    )
    rows = [[student[i, j] for j in range(5)] for i in range(6)]
    teacher_rows = [[teacher[i, j] for j in range(5)] for i in range(6)]
    slow = kl_rows_ref(rows, teacher_rows, temperature, reduction)
    assert_same(fast, slow, (student,))
    (teacher_grad,) = torch.autograd.grad(
        distillation_loss(student, teacher_logits=teacher, temperature=temperature),
        teacher,
        allow_unused=True,
    )
    assert teacher_grad is None  # the teacher is detached


def test_soft_term_is_cross_entropy_minus_teacher_entropy():
    """Survey eq. 18, -sum p log q, differs from the KL form by a constant (the teacher's
    entropy), so the gradients match."""
    student, teacher, _ = logits(4)
    T = 3.0
    p = F.softmax(teacher.detach() / T, dim=1)
    cross_entropy = -(p * F.log_softmax(student / T, dim=1)).sum(1).mean() * T**2
    entropy = -(p * p.log()).sum(1).mean() * T**2
    kd = distillation_loss(student, teacher_logits=teacher, temperature=T)
    torch.testing.assert_close(kd, cross_entropy - entropy)
    g1 = torch.autograd.grad(kd, student)[0]
    g2 = torch.autograd.grad(cross_entropy, student)[0]
    torch.testing.assert_close(g1, g2)


def test_hard_label_weight_mixes_plain_cross_entropy():
    student, teacher, labels = logits(2)
    mixed = distillation_loss(
        student, labels, teacher_logits=teacher, temperature=2.0, hard_label_weight=0.3
    )
    expected = 0.7 * distillation_loss(
        student, teacher_logits=teacher, temperature=2.0
    ) + 0.3 * F.cross_entropy(student, labels)
    assert_same(mixed, expected, (student,))


def test_matching_teacher_gives_zero():
    student, _, _ = logits(1)
    loss = distillation_loss(student, teacher_logits=student.detach().clone(), temperature=5.0)
    assert abs(float(loss.detach())) < 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_similarity_distillation_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 7, generator=g, dtype=torch.float64)
    fast = similarity_distillation_loss(student, teacher_emb=teacher, temperature=0.3)
    rows, teacher_rows = [], []
    for i in range(5):
        rows.append([cosine(student[i], student[j]) for j in range(5) if j != i])
        teacher_rows.append([cosine(teacher[i], teacher[j]) for j in range(5) if j != i])
    assert_same(fast, kl_rows_ref(rows, teacher_rows, 0.3), (student,))


def test_similarity_distillation_with_reference_sets_and_distance():
    g = torch.Generator().manual_seed(7)
    student = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    teacher, teacher_ref = torch.randn(4, 5, generator=g), torch.randn(6, 5, generator=g)
    teacher, teacher_ref = teacher.double(), teacher_ref.double()
    fast = similarity_distillation_loss(
        student,
        ref_emb=ref,
        teacher_emb=teacher,
        teacher_ref_emb=teacher_ref,
        temperature=0.5,
        distance=EuclideanDistance(),
    )
    rows = [[-torch.dist(student[i], ref[j]) for j in range(6)] for i in range(4)]
    teacher_rows = [[-torch.dist(teacher[i], teacher_ref[j]) for j in range(6)] for i in range(4)]
    assert_same(fast, kl_rows_ref(rows, teacher_rows, 0.5), (student, ref))


def test_module_modes_and_checks():
    student, teacher, labels = logits(0)
    loss_fn = DistillationLoss(temperature=4.0, hard_label_weight=0.5)
    torch.testing.assert_close(
        loss_fn(student, labels, teacher_emb=teacher),
        distillation_loss(
            student, labels, teacher_logits=teacher, temperature=4.0, hard_label_weight=0.5
        ),
    )
    sim = DistillationLoss(temperature=0.1, distance=CosineSimilarity())
    torch.testing.assert_close(
        sim(student, teacher_emb=teacher),
        similarity_distillation_loss(student, teacher_emb=teacher, temperature=0.1),
    )
    single = sim(student[:1], teacher_emb=teacher[:1])
    assert float(single.detach()) == 0.0
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0.0)
    with pytest.raises(ValueError, match="hard_label_weight"):
        DistillationLoss(hard_label_weight=1.5)
    with pytest.raises(ValueError, match="shape"):
        loss_fn(student, labels, teacher_emb=teacher[:, :3])
    with pytest.raises(ValueError, match="needs labels"):
        loss_fn(student, teacher_emb=teacher)
    with pytest.raises(ValueError, match="indices_tuple"):
        loss_fn(student, labels, indices_tuple=(labels, labels, labels), teacher_emb=teacher)
    with pytest.raises(ValueError, match="rows"):
        sim(student, teacher_emb=teacher[:3])


def test_bf16_and_large_logits_are_finite():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(8, 6)) * 1e3
        loss = DistillationLoss(temperature=1.0)(out, teacher_emb=torch.randn(8, 10) * 1e3)
    loss.float().backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(model.weight.grad).all())
    sim_loss = similarity_distillation_loss(
        torch.randn(6, 4, requires_grad=True), teacher_emb=torch.randn(6, 9), temperature=0.001
    )
    assert bool(torch.isfinite(sim_loss))
