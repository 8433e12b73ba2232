"""The proxy, centre and softmax-classifier family at its input boundary (SPEC §9, issue 10):
hyper-parameters checked whenever they are set, labels of every integer dtype, half-precision
overflow, zero rows under cosine losses (no gradient), the distances each loss
accepts, the heated-up schedule's temperature, and uniform stats."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric import losses
from deepmetric.distances import (
    CosineSimilarity,
    DotProductSimilarity,
    EuclideanDistance,
    SquaredEuclideanDistance,
)
from deepmetric.losses.classifier import ClassifierLoss, ClassifierStats
from deepmetric.losses.proxy import ProxyAnchorStats


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def classifier_classes():
    """Every public class-vector loss of deepmetric.losses, found by introspection."""
    found = [getattr(losses, name) for name in losses.__all__]
    return [c for c in found if inspect.isclass(c) and issubclass(c, ClassifierLoss)]


CLASSES = classifier_classes()
REQUIRED = {"heat_up_at": 1}  # the one required argument besides num_classes, embedding_size


def build(cls, num_classes=3, dim=4, **kwargs):
    return (
        cls(num_classes, dim, **{**REQUIRED, **kwargs})
        if _needs(cls)
        else cls(num_classes, dim, **kwargs)
    )


def _needs(cls):
    parameters = inspect.signature(cls).parameters
    return any(name in parameters for name in REQUIRED)


def test_every_class_vector_loss_is_found():
    names = {c.__name__ for c in CLASSES}
    assert {"ArcFaceLoss", "ProxyNCALoss", "CenterLoss", "AdditiveMarginLoss"} <= names
    assert len(CLASSES) == 10


# ---------------------------------------------------------------- hyper-parameters


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_hyper_parameters_fail_when_set(cls, bad):
    """At construction and by assignment afterwards, every hyper-parameter rejects NaN and
    inf with an error naming it."""
    loss_fn = build(cls)
    assert loss_fn.hyper_parameters, cls
    for name in loss_fn.hyper_parameters:
        with pytest.raises((ValueError, TypeError), match=name):
            setattr(loss_fn, name, bad)
        if name in inspect.signature(cls).parameters:
            with pytest.raises((ValueError, TypeError), match=name):
                build(cls, **{name: bad})


def test_arcface_infinite_scale_is_rejected():
    """Issue 10: ArcFaceLoss(10, 8, scale=inf) gave a NaN loss and NaN gradients."""
    with pytest.raises(ValueError, match="scale"):
        losses.ArcFaceLoss(10, 8, scale=float("inf"))
    loss_fn = losses.ArcFaceLoss(10, 8)
    with pytest.raises(ValueError, match="scale"):
        loss_fn.scale = float("nan")
    assert loss_fn.scale == 64.0  # the bad value was not stored
    with pytest.raises(ValueError, match="scale"):
        losses.arcface_loss(
            torch.randn(4, 8), torch.arange(4), weight=torch.randn(10, 8), scale=1e400
        )


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda x, y, w: losses.proxy_nca_loss(x, y, proxies=w, softmax_scale=math.nan), "softmax"),
        (lambda x, y, w: losses.proxy_anchor_loss(x, y, proxies=w, alpha=math.inf), "alpha"),
        (lambda x, y, w: losses.proxy_anchor_loss(x, y, proxies=w, margin=math.nan), "margin"),
        (
            lambda x, y, w: losses.center_loss(x, y, weight=w, centers=w, center_weight=math.inf),
            "center_weight",
        ),
        (lambda x, y, w: losses.additive_margin_loss(x, y, centers=w, margin=math.nan), "margin"),
        (lambda x, y, w: losses.cosface_loss(x, y, weight=w, scale=-math.inf), "scale"),
        (lambda x, y, w: losses.normalized_softmax_loss(x, y, weight=w, temperature=0), "temp"),
        (lambda x, y, w: losses.large_margin_softmax_loss(x, y, weight=w, lambda_=math.inf), "lam"),
        (
            lambda x, y, w: losses.distillation_loss(x, teacher_logits=x, temperature=math.nan),
            "temperature",
        ),
    ],
)
def test_functions_reject_non_finite_hyper_parameters(call, argument):
    x, y, w = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.randn(3, 4)
    with pytest.raises(ValueError, match=argument):
        call(x, y, w)


def test_lambda_schedule_rejects_non_finite():
    with pytest.raises(ValueError, match="base"):
        losses.LambdaSchedule(base=math.inf)


# ---------------------------------------------------------------- labels of every dtype


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.bool])
def test_labels_of_any_integer_dtype(cls, dtype):
    """The same loss, value and gradient, as with int64 labels (bool: classes 0 and 1)."""
    torch.manual_seed(0)
    reference = build(cls, 3, 4).eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = (
        torch.tensor([0, 1, 1, 0, 1, 0])
        if dtype is torch.bool
        else torch.tensor([0, 1, 2, 2, 1, 0])
    )
    reference = reference.double()
    expected_x = x.clone().requires_grad_()
    expected = reference(expected_x, y)
    expected.backward()
    got_x = x.clone().requires_grad_()
    got = reference(got_x, y.to(dtype))
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_x.grad, expected_x.grad)


def test_center_update_takes_int32_labels():
    torch.manual_seed(0)
    loss_fn = losses.CenterLoss(3, 4)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32)
    before = loss_fn.centers.clone()
    loss_fn(x, y)
    torch.testing.assert_close(loss_fn.centers, losses.update_centers(before, x, y.long(), 0.5))


# ---------------------------------------------------------------- half precision


def test_center_loss_half_overflow_raises_instead_of_inf():
    """Issue 10: CenterLoss(10, 8)((x * 1e4).half(), y) returned inf. It computes in float32
    and raises when float16 cannot hold the result."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 10, (16,))
    loss_fn = losses.CenterLoss(10, 8)
    exact = loss_fn.eval()((x * 1e4).half().float(), y).detach()
    assert math.isfinite(float(exact)) and float(exact) > torch.finfo(torch.float16).max
    with pytest.raises(ValueError, match="float16"):
        loss_fn((x * 1e4).half(), y)


def test_half_inputs_compute_in_float32():
    """A float16 call equals the float32 call on the same (half-rounded) values, rounded
    once at the end: the computation itself ran in float32."""
    torch.manual_seed(0)
    x, y = (torch.randn(16, 8) * 30).half(), torch.randint(0, 10, (16,))
    loss_fn = losses.CenterLoss(10, 8, center_weight=0.01).eval()
    got = loss_fn(x, y)
    assert got.dtype == torch.float16 and bool(torch.isfinite(got))
    assert got == loss_fn(x.float(), y).half()


# ---------------------------------------------------------------- zero rows under cosines


def _normalized_logits(x, w):
    return F.normalize(x, dim=1) @ F.normalize(w, dim=1).T


def _proxy_anchor_reference(x, y, p, margin, alpha):
    cos = _normalized_logits(x, p)
    positive = F.one_hot(y, len(p)).bool()
    pos = torch.where(positive, torch.exp(-alpha * (cos - margin)), 0).sum(0)
    neg = torch.where(positive, 0, torch.exp(alpha * (cos + margin))).sum(0)
    has = positive.any(0)
    return torch.log1p(pos)[has].mean() + torch.log1p(neg).mean()


def _nca_reference(x, y, p, scale):
    d2 = (F.normalize(x, dim=1)[:, None] - F.normalize(p, dim=1)[None]).pow(2).sum(-1)
    logits = -scale * d2
    others = logits.masked_fill(F.one_hot(y, len(p)).bool(), -math.inf).logsumexp(1)
    return (others - logits.gather(1, y[:, None]).squeeze(1)).mean()


def _arcface_reference(x, y, w, margin, scale):
    cos = _normalized_logits(x, w)
    theta = torch.acos(cos.gather(1, y[:, None]).clamp(-1 + 1e-7, 1 - 1e-7))
    return F.cross_entropy(scale * cos.scatter(1, y[:, None], torch.cos(theta + margin)), y)


def _cosface_reference(x, y, w, margin, scale):
    cos = _normalized_logits(x, w)
    return F.cross_entropy(scale * (cos - margin * F.one_hot(y, len(w))), y)


COSINE_CASES = {
    "NormalizedSoftmaxLoss": (
        lambda: losses.NormalizedSoftmaxLoss(3, 4, temperature=0.5),
        lambda x, y, w: F.cross_entropy(_normalized_logits(x, w) / 0.5, y),
    ),
    "HeatedUpSoftmaxLoss": (
        lambda: losses.HeatedUpSoftmaxLoss(3, 4, heat_up_at=5, initial_scale=3.0),
        lambda x, y, w: F.cross_entropy(_normalized_logits(x, w) * 3.0, y),
    ),
    "CosFaceLoss": (
        lambda: losses.CosFaceLoss(3, 4, margin=0.3, scale=4.0),
        lambda x, y, w: _cosface_reference(x, y, w, 0.3, 4.0),
    ),
    "ArcFaceLoss": (
        lambda: losses.ArcFaceLoss(3, 4, margin=0.4, scale=4.0),
        lambda x, y, w: _arcface_reference(x, y, w, 0.4, 4.0),
    ),
    "ProxyAnchorLoss": (
        lambda: losses.ProxyAnchorLoss(3, 4, margin=0.1, alpha=4.0),
        lambda x, y, p: _proxy_anchor_reference(x, y, p, 0.1, 4.0),
    ),
    "ProxyNCALoss": (
        lambda: losses.ProxyNCALoss(3, 4, softmax_scale=2.0),
        lambda x, y, p: _nca_reference(x, y, p, 2.0),
    ),
    "AdditiveMarginLoss(cosine)": (
        lambda: losses.AdditiveMarginLoss(3, 4, margin=0.3, scale=4.0, distance=CosineSimilarity()),
        lambda x, y, c: _cosface_reference(x, y, c, 0.3, 4.0),
    ),
}


def assert_zero_row_gradients(fast_grads, slow_grads, zero_row):
    """The x gradient is exactly 0 on the zero row; every other gradient equals the
    F.normalize reference's (the two agree in value everywhere)."""
    (fast_x, *fast_rest), (slow_x, *slow_rest) = fast_grads, slow_grads
    assert bool((fast_x[zero_row] == 0).all())
    assert float(slow_x[zero_row].abs().max()) > 1e6  # F.normalize's 1 / eps, not taken
    keep = torch.arange(len(fast_x)) != zero_row
    torch.testing.assert_close(fast_x[keep], slow_x[keep], rtol=1e-7, atol=1e-9)
    for got, expected in zip(fast_rest, slow_rest, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("case", COSINE_CASES, ids=str)
def test_zero_rows_pass_no_gradient(case):
    """An all-zero embedding row under a cosine loss: the loss equals a reference written
    with torch.nn.functional.normalize, and so do all gradients except the zero row's, which
    is 0 (deepmetric.distances.safe_normalize, the library's policy) instead of
    F.normalize's 1 / eps = 1e12 times the incoming gradient."""
    make, reference = COSINE_CASES[case]
    torch.manual_seed(0)
    loss_fn = make().double().eval()
    (vectors,) = [p for p in loss_fn.parameters()]
    x = torch.randn(6, 4, dtype=torch.float64)
    x[2] = 0
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    fast_x, slow_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast = loss_fn(fast_x, y)
    slow = reference(slow_x, y, vectors)
    torch.testing.assert_close(fast, slow)
    assert_zero_row_gradients(
        torch.autograd.grad(fast, (fast_x, vectors)),
        torch.autograd.grad(slow, (slow_x, vectors)),
        2,
    )


def test_similarity_distillation_zero_row_passes_no_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    x[1] = 0
    teacher = torch.randn(5, 6, generator=g, dtype=torch.float64)
    fast_x, slow_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast = losses.similarity_distillation_loss(fast_x, teacher_emb=teacher, temperature=0.5)
    eye = torch.eye(5, dtype=torch.bool)
    student = _normalized_logits(slow_x, slow_x).masked_fill(eye, -math.inf) / 0.5
    target = _normalized_logits(teacher, teacher).masked_fill(eye, -math.inf) / 0.5
    log_q, log_p = F.log_softmax(student, 1), F.log_softmax(target, 1)
    kl = torch.where(eye, 0, log_p.exp() * (log_p - log_q)).sum(1)
    slow = 0.25 * kl.mean()
    torch.testing.assert_close(fast, slow)
    assert_zero_row_gradients(
        torch.autograd.grad(fast, (fast_x,)), torch.autograd.grad(slow, (slow_x,)), 1
    )


@pytest.mark.parametrize("cls", [losses.LargeMarginSoftmaxLoss, losses.SphereFaceLoss])
def test_zero_rows_under_norm_keeping_losses_are_finite(cls):
    """L-Softmax and SphereFace keep ||x|| in the logits: a zero row has zero logits."""
    loss_fn = cls(3, 4, lambda_schedule=None)
    x = torch.randn(6, 4)
    x[0] = 0
    x.requires_grad_()
    loss = loss_fn(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(x.grad).all())


# ---------------------------------------------------------------- distances


COSINE_ONLY = [
    losses.NormalizedSoftmaxLoss,
    losses.HeatedUpSoftmaxLoss,
    losses.CosFaceLoss,
    losses.ArcFaceLoss,
    losses.ProxyAnchorLoss,
]


@pytest.mark.parametrize("cls", COSINE_ONLY, ids=lambda c: c.__name__)
def test_cosine_losses_reject_other_distances_at_construction(cls):
    with pytest.raises(ValueError, match="distance=EuclideanDistance"):
        build(cls, distance=EuclideanDistance())
    assert isinstance(build(cls, distance=CosineSimilarity()).distance, CosineSimilarity)


def test_distance_rules_of_the_other_losses():
    with pytest.raises(ValueError, match="distance"):
        losses.LargeMarginSoftmaxLoss(3, 4, distance=CosineSimilarity())
    assert type(losses.SphereFaceLoss(3, 4).distance) is DotProductSimilarity
    with pytest.raises(ValueError, match="distance"):
        losses.CenterLoss(3, 4, distance=CosineSimilarity())
    with pytest.raises(TypeError, match="distance"):
        losses.ProxyNCALoss(3, 4, distance="euclidean")


def test_center_loss_takes_a_distance_for_its_centre_term():
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    w, b, c = torch.randn(3, 4).double(), torch.zeros(3).double(), torch.randn(3, 4).double()
    got = losses.center_loss(
        x, y, weight=w, bias=b, centers=c, center_weight=0.4, distance=EuclideanDistance()
    )
    expected = F.cross_entropy(x @ w.T, y) + 0.2 * (x - c[y]).norm(dim=1).mean()
    torch.testing.assert_close(got, expected)


def test_distance_set_after_construction_is_checked_at_the_call():
    loss_fn = losses.ArcFaceLoss(3, 4)
    loss_fn.distance = SquaredEuclideanDistance()
    with pytest.raises(ValueError, match="distance=SquaredEuclideanDistance"):
        loss_fn(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))


def test_functions_take_distance_and_reject_what_they_cannot_use():
    x, y, w = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.randn(3, 4)
    torch.testing.assert_close(
        losses.arcface_loss(x, y, weight=w, distance=CosineSimilarity()),
        losses.arcface_loss(x, y, weight=w),
    )
    for function in (losses.arcface_loss, losses.cosface_loss, losses.normalized_softmax_loss):
        with pytest.raises(ValueError, match="distance"):
            function(x, y, weight=w, distance=EuclideanDistance())
    with pytest.raises(ValueError, match="distance"):
        losses.proxy_anchor_loss(x, y, proxies=w, distance=EuclideanDistance())


def test_positional_class_vectors_get_a_clear_error():
    x, y, w = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.randn(3, 4)
    with pytest.raises(TypeError, match="weight"):
        losses.cosface_loss(x, y, w)
    with pytest.raises(TypeError, match="keyword-only"):
        losses.cosface_loss(x, y, w, weight=w)


# ---------------------------------------------------------------- heated-up schedule


def test_heated_up_temperature_follows_the_schedule():
    """Issue 10: `temperature` read a stale value after step()."""
    loss_fn = losses.HeatedUpSoftmaxLoss(3, 4, heat_up_at=1, initial_scale=16.0, final_scale=4.0)
    assert loss_fn.temperature == 1 / 16
    loss_fn.step()
    assert loss_fn.temperature == 1 / 4 and loss_fn.scale == 4.0
    with pytest.raises(AttributeError):
        loss_fn.temperature = 0.1
    loss_fn.final_scale = 8.0
    assert loss_fn.temperature == 1 / 8
    with pytest.raises(ValueError, match="final_scale"):
        loss_fn.final_scale = math.nan


# ---------------------------------------------------------------- stats


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("reduction", ["mean", "nonzero_mean", "sum"])
def test_every_module_reports_stats(cls, reduction):
    torch.manual_seed(0)
    loss_fn = build(cls, 3, 4, reduction=reduction).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    loss = loss_fn(x, y)
    stats = loss_fn.stats
    if isinstance(stats, ProxyAnchorStats):
        assert not loss_fn.local_anchor_supported and loss_fn.local_anchor_reason
        parts = (stats.positive, stats.negative)
        torch.testing.assert_close(loss, sum(p.loss_sum / p.normaliser for p in parts))
        assert (stats.positive.num_terms, stats.negative.num_terms) == (3, 3)
        return
    assert isinstance(stats, ClassifierStats)
    torch.testing.assert_close(loss, stats.loss_sum / stats.normaliser)
    assert stats.loss_sum.requires_grad and stats.num_terms == 7
    expected = {"mean": 7.0, "sum": 1.0, "nonzero_mean": float(stats.num_active)}[reduction]
    assert float(stats.normaliser) == expected


def test_functions_return_stats():
    x, y, w = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.randn(3, 4)
    loss, stats = losses.arcface_loss(x, y, weight=w, return_stats=True)
    torch.testing.assert_close(loss, stats.loss_sum / stats.normaliser)
    loss, stats = losses.distillation_loss(x, teacher_logits=x * 2, return_stats=True)
    torch.testing.assert_close(loss, stats.loss_sum / stats.normaliser)
    module = losses.DistillationLoss(temperature=2.0)
    module(x, teacher_emb=x * 2)
    assert module.stats.num_terms == 5


def test_repr_lists_hyper_parameters_once():
    text = repr(losses.ArcFaceLoss(3, 4, margin=0.3))
    assert "margin=0.3" in text and "scale=64.0" in text and text.count(" margin=") == 1


@pytest.mark.parametrize("name", ["lr", "loss_lr", "weight_decay", "loss_weight_decay"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_param_groups_reject_non_finite_rates(name, bad):
    model, loss_fn = torch.nn.Linear(3, 4), losses.ProxyAnchorLoss(3, 4)
    with pytest.raises(ValueError, match=name):
        losses.param_groups(model, loss_fn, **{"lr": 0.1, name: bad})


def test_item_ids_are_accepted_and_checked():
    """The keyword-only query_ids of every loss: checked, no effect (rows are compared with
    class vectors only); ref_ids has nothing to refer to."""
    torch.manual_seed(0)
    loss_fn = losses.CosFaceLoss(3, 4).eval()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(
        loss_fn(x, y, query_ids=torch.tensor([7, 7, 1, 2, 3])), loss_fn(x, y)
    )
    with pytest.raises(ValueError, match="query_ids"):
        loss_fn(x, y, query_ids=torch.arange(4))
    with pytest.raises(ValueError, match="ref_ids"):
        loss_fn(x, y, ref_ids=torch.arange(5))
    assert not losses.DistillationLoss.local_anchor_supported


@pytest.mark.parametrize("name", ["diameter_factor", "initial_margin", "max_margin"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_adaptive_margin_rejects_non_finite(name, bad):
    with pytest.raises(ValueError, match=name):
        losses.AdaptiveMargin(**{name: bad})
