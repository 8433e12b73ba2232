"""Softmax-classifier losses against slow from-the-formula references (float64, explicit
loops over samples and classes), their reductions to the plain normalised softmax, the
numerics at the edges (cos = +-1, large scales, bf16 autocast) and the input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric.losses.softmax import (
    ArcFaceLoss,
    CosFaceLoss,
    HeatedUpSoftmaxLoss,
    LambdaSchedule,
    LargeMarginSoftmaxLoss,
    NormalizedSoftmaxLoss,
    SphereFaceLoss,
    arcface_loss,
    cosface_loss,
    large_margin_softmax_loss,
    normalized_softmax_loss,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(seed, n=7, num_classes=4, dim=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(num_classes, dim, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y, w


# ---------------------------------------------------------------- slow references


def norm(v):
    return torch.sqrt(sum(v[k] * v[k] for k in range(len(v))))


def dot(a, b):
    return sum(a[k] * b[k] for k in range(len(a)))


def cos_between(a, b):
    return dot(a, b) / (norm(a) * norm(b))


def cross_entropy_ref(logits, target):
    """-log(exp(l_t) / sum_j exp(l_j)) from a Python list of scalar logits."""
    return -logits[target] + torch.log(sum(torch.exp(v) for v in logits))


def reduce_ref(terms, reduction):
    total = sum(terms)
    if reduction == "sum":
        return total
    if reduction == "nonzero_mean":
        return total / max(sum(1 for t in terms if t > 0), 1)
    return total / len(terms)


def normalized_softmax_ref(x, y, w, temperature, reduction="mean"):
    terms = []
    for i in range(len(x)):
        logits = [cos_between(x[i], w[j]) / temperature for j in range(len(w))]
        terms.append(cross_entropy_ref(logits, int(y[i])))
    return reduce_ref(terms, reduction)


def psi_ref(theta, m):
    k = math.floor(m * float(theta.detach()) / math.pi)
    return (-1) ** k * torch.cos(m * theta) - 2 * k


def large_margin_ref(x, y, w, margin, scale, normalize_weights, lam, reduction="mean"):
    terms = []
    for i in range(len(x)):
        logits = []
        for j in range(len(w)):
            w_norm = torch.ones((), dtype=x.dtype) if normalize_weights else norm(w[j])
            cos = cos_between(x[i], w[j])
            if j == int(y[i]):
                theta = torch.acos(cos)
                value = (lam * cos + psi_ref(theta, margin)) / (1 + lam)
            else:
                value = cos
            logits.append(scale * w_norm * norm(x[i]) * value)
        terms.append(cross_entropy_ref(logits, int(y[i])))
    return reduce_ref(terms, reduction)


def cosface_ref(x, y, w, margin, scale, reduction="mean"):
    """Seed 000's closing formula: log(1 + sum_{i != y} exp(s (cos_i + m - cos_y)))."""
    terms = []
    for i in range(len(x)):
        cos_y = cos_between(x[i], w[int(y[i])])
        inner = 1 + sum(
            torch.exp(scale * (cos_between(x[i], w[j]) + margin - cos_y))
            for j in range(len(w))
            if j != int(y[i])
        )
        terms.append(torch.log(inner))
    return reduce_ref(terms, reduction)


def arcface_ref(x, y, w, margin, scale, easy_margin, reduction="mean"):
    terms = []
    for i in range(len(x)):
        logits = []
        for j in range(len(w)):
            cos = cos_between(x[i], w[j])
            if j == int(y[i]):
                theta = torch.acos(cos)
                if easy_margin:
                    cos = torch.cos(theta + margin) if cos > 0 else cos
                elif float(theta.detach()) + margin <= math.pi:
                    cos = torch.cos(theta + margin)
                else:
                    cos = cos - margin * math.sin(margin)
            logits.append(scale * cos)
        terms.append(cross_entropy_ref(logits, int(y[i])))
    return reduce_ref(terms, reduction)


def assert_same(fast, slow, inputs):
    """Values and gradients of two scalar losses agree."""
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-10)
    fast_grads = torch.autograd.grad(fast, inputs, retain_graph=True)
    slow_grads = torch.autograd.grad(slow, inputs)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- against the references


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("reduction", ["mean", "sum", "nonzero_mean"])
def test_normalized_softmax_matches_reference(seed, reduction):
    x, y, w = batch(seed)
    fast = normalized_softmax_loss(x, y, weight=w, temperature=0.2, reduction=reduction)
    assert_same(fast, normalized_softmax_ref(x, y, w, 0.2, reduction), (x, w))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("margin", [1, 2, 3, 4])
@pytest.mark.parametrize("normalize_weights", [False, True])
@pytest.mark.parametrize("lam", [0.0, 2.5])
def test_large_margin_matches_reference(seed, margin, normalize_weights, lam):
    x, y, w = batch(seed, n=6)
    fast = large_margin_softmax_loss(
        x, y, weight=w, margin=margin, scale=1.3, normalize_weights=normalize_weights, lambda_=lam
    )
    slow = large_margin_ref(x, y, w, margin, 1.3, normalize_weights, lam)
    assert_same(fast, slow, (x, w))


def test_psi_is_continuous_and_decreasing():
    """psi(theta) from the Chebyshev form follows (-1)^k cos(m theta) - 2k on [0, pi]."""
    from deepmetric.losses.softmax import _chebyshev_psi

    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    for m in (1, 2, 3, 4, 5):
        psi = _chebyshev_psi(torch.cos(theta), m)
        expected = torch.stack([psi_ref(t, m) for t in theta[1:-1]])
        torch.testing.assert_close(psi[1:-1], expected, rtol=1e-9, atol=1e-9)
        assert bool((psi.diff() <= 1e-12).all())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cosface_matches_seed_formula(seed, reduction):
    x, y, w = batch(seed)
    fast = cosface_loss(x, y, weight=w, margin=0.35, scale=8.0, reduction=reduction)
    assert_same(fast, cosface_ref(x, y, w, 0.35, 8.0, reduction), (x, w))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("easy_margin", [False, True])
@pytest.mark.parametrize("margin", [0.3, 0.5, 1.2])
def test_arcface_matches_reference(seed, easy_margin, margin):
    x, y, w = batch(seed, n=9)
    fast = arcface_loss(x, y, weight=w, margin=margin, scale=6.0, easy_margin=easy_margin)
    assert_same(fast, arcface_ref(x, y, w, margin, 6.0, easy_margin), (x, w))


def test_arcface_fix_keeps_target_logit_decreasing():
    """cos(theta + m) rises again past theta = pi - m; the fixed target logit does not."""
    margin = 0.5
    theta = torch.linspace(0.01, math.pi - 0.01, 400, dtype=torch.float64)
    # the other class is orthogonal to the plane x turns in, so only the target logit moves
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    x = torch.stack([torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)], dim=1)
    y = torch.zeros(len(x), dtype=torch.long)
    per_sample = torch.stack(
        [
            arcface_loss(x[i : i + 1], y[i : i + 1], weight=w, margin=margin, scale=1.0)
            for i in range(400)
        ]
    )

    # the loss of a sample must grow as it turns away from its class (theta up)
    assert bool((per_sample.diff() > 0).all())


# ---------------------------------------------------------------- reductions and identities


def unit_batch(seed, n=8, num_classes=5, dim=6):
    x, y, w = batch(seed, n, num_classes, dim)
    with torch.no_grad():
        x.copy_(F.normalize(x, dim=1))
        w.copy_(F.normalize(w, dim=1))
    return x, y, w


@pytest.mark.parametrize("seed", range(3))
def test_margin_family_without_margin_is_normalized_softmax(seed):
    """m = 0 (m = 1 for multiplicative margins) and s = 1 give the plain normalised
    softmax (temperature 1) on unit features and weights."""
    x, y, w = unit_batch(seed)
    for loss in (
        cosface_loss(x, y, weight=w, margin=0.0, scale=1.0),
        arcface_loss(x, y, weight=w, margin=0.0, scale=1.0),
        arcface_loss(x, y, weight=w, margin=0.0, scale=1.0, easy_margin=True),
    ):
        assert_same(loss, normalized_softmax_loss(x, y, weight=w, temperature=1.0), (x, w))
    # the multiplicative family keeps the norms in the logits, so only the values agree
    # on unit vectors (the gradients keep a radial part)
    plain = normalized_softmax_loss(x, y, weight=w, temperature=1.0)
    for loss in (
        large_margin_softmax_loss(x, y, weight=w, margin=1, scale=1.0, normalize_weights=True),
        large_margin_softmax_loss(x, y, weight=w, margin=1, scale=1.0, lambda_=3.0),
    ):
        torch.testing.assert_close(loss, plain)


@pytest.mark.parametrize("seed", range(3))
def test_multiplicative_margin_one_is_plain_softmax(seed):
    """m = 1: L-Softmax is the bias-free softmax of x.w, SphereFace that of x.w^."""
    x, y, w = batch(seed)
    assert_same(
        large_margin_softmax_loss(x, y, weight=w, margin=1, lambda_=2.0),
        F.cross_entropy(x @ w.T, y),
        (x, w),
    )
    assert_same(
        large_margin_softmax_loss(x, y, weight=w, margin=1, normalize_weights=True),
        F.cross_entropy(x @ F.normalize(w, dim=1).T, y),
        (x, w),
    )


def test_modules_without_margin_equal_normalized_softmax_module():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(10, 6, dtype=torch.float64), dim=1)
    y = torch.randint(0, 4, (10,))
    reference = NormalizedSoftmaxLoss(4, 6, temperature=1.0).double()
    with torch.no_grad():
        reference.weight.copy_(F.normalize(reference.weight, dim=1))
    expected = reference(x, y)
    for module in (
        CosFaceLoss(4, 6, margin=0.0, scale=1.0),
        ArcFaceLoss(4, 6, margin=0.0, scale=1.0),
        SphereFaceLoss(4, 6, margin=1, scale=1.0),
        LargeMarginSoftmaxLoss(4, 6, margin=1, scale=1.0),
    ):
        module = module.double()
        module.load_state_dict(reference.state_dict(), strict=False)
        torch.testing.assert_close(module(x, y), expected)


def test_temperature_and_scale_are_reciprocal():
    x, y, w = batch(5)
    torch.testing.assert_close(
        normalized_softmax_loss(x, y, weight=w, temperature=0.25),
        cosface_loss(x, y, weight=w, margin=0.0, scale=4.0),
    )


# ---------------------------------------------------------------- schedules


def test_heated_up_schedule_switches_and_ramps():
    loss_fn = HeatedUpSoftmaxLoss(3, 4, heat_up_at=3, initial_scale=16.0, final_scale=4.0)
    scales = [loss_fn.scale] + [loss_fn.step() for _ in range(4)]
    assert scales == [16.0, 16.0, 16.0, 4.0, 4.0]
    ramp = HeatedUpSoftmaxLoss(
        3, 4, heat_up_at=2, initial_scale=10.0, final_scale=2.0, ramp_steps=3
    )
    scales = [ramp.scale] + [ramp.step() for _ in range(6)]
    assert scales == pytest.approx([10.0, 10.0, 8.0, 6.0, 4.0, 2.0, 2.0])
    cooling = HeatedUpSoftmaxLoss(3, 4, heat_up_at=1, initial_scale=2.0, final_scale=32.0)
    cooling.step()
    assert cooling.scale == 32.0


def test_heated_up_uses_current_scale_and_saves_step():
    torch.manual_seed(0)
    loss_fn = HeatedUpSoftmaxLoss(3, 4, heat_up_at=1, initial_scale=16.0, final_scale=4.0)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    before = loss_fn(x, y)
    torch.testing.assert_close(
        before, normalized_softmax_loss(x, y, weight=loss_fn.weight, temperature=1 / 16)
    )
    loss_fn.step()
    after = loss_fn(x, y)
    torch.testing.assert_close(
        after, normalized_softmax_loss(x, y, weight=loss_fn.weight, temperature=1 / 4)
    )
    restored = HeatedUpSoftmaxLoss(3, 4, heat_up_at=1, initial_scale=16.0, final_scale=4.0)
    restored.load_state_dict(loss_fn.state_dict())
    assert restored.num_steps == 1 and restored.scale == 4.0


def test_lambda_schedule_is_sphereface_annealing():
    schedule = LambdaSchedule()
    assert schedule(0) == 1000.0
    assert schedule(10) == pytest.approx(1000.0 / (1 + 0.12 * 10))
    assert schedule(10**6) == 5.0
    loss_fn = SphereFaceLoss(3, 4)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn(x, y)
    loss_fn(x, y)
    assert loss_fn.num_steps == 2 and loss_fn.current_lambda == pytest.approx(1000 / 1.24)
    loss_fn.eval()
    loss_fn(x, y)
    assert loss_fn.num_steps == 2
    restored = SphereFaceLoss(3, 4)
    restored.load_state_dict(loss_fn.state_dict())
    assert restored.num_steps == 2
    assert LargeMarginSoftmaxLoss(3, 4, lambda_schedule=None).current_lambda == 0.0
    with pytest.raises(ValueError, match="gamma"):
        LambdaSchedule(gamma=-1.0)


def test_module_uses_current_lambda():
    torch.manual_seed(1)
    loss_fn = SphereFaceLoss(3, 4, lambda_schedule=LambdaSchedule(base=7.0, minimum=0.0))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = large_margin_softmax_loss(
        x, y, weight=loss_fn.weight, margin=4, normalize_weights=True, lambda_=7.0
    )
    torch.testing.assert_close(loss_fn(x, y), expected)


# ---------------------------------------------------------------- numerics at the edges


ALL_MODULES = [
    lambda c, d: NormalizedSoftmaxLoss(c, d, temperature=0.01),
    lambda c, d: HeatedUpSoftmaxLoss(c, d, heat_up_at=5, initial_scale=128.0),
    lambda c, d: CosFaceLoss(c, d, scale=128.0),
    lambda c, d: ArcFaceLoss(c, d, scale=128.0),
    lambda c, d: ArcFaceLoss(c, d, scale=64.0, easy_margin=True),
    lambda c, d: SphereFaceLoss(c, d, scale=64.0),
    lambda c, d: LargeMarginSoftmaxLoss(c, d, scale=64.0, lambda_schedule=None),
]


def finite_loss_and_grads(loss_fn, x, y):
    x = x.clone().requires_grad_()
    loss = loss_fn(x, y)
    loss.backward()
    grads = [x.grad] + [p.grad for p in loss_fn.parameters()]
    return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("make", ALL_MODULES)
def test_cos_at_plus_minus_one_is_finite(make):
    """Embeddings equal to their class weight (cos = 1) or its opposite (cos = -1)."""
    loss_fn = make(3, 4)
    w = loss_fn.weight.detach()
    x = torch.cat([w, -w, 5 * w])
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    assert finite_loss_and_grads(loss_fn, x, y)


@pytest.mark.parametrize("make", ALL_MODULES)
def test_large_scales_and_large_inputs_are_finite(make):
    torch.manual_seed(0)
    loss_fn = make(50, 16)
    x = torch.randn(32, 16) * 1e3
    y = torch.randint(0, 50, (32,))
    assert finite_loss_and_grads(loss_fn, x, y)


@pytest.mark.parametrize("make", ALL_MODULES)
def test_edge_batches(make):
    torch.manual_seed(0)
    one_class = make(1, 4)
    assert finite_loss_and_grads(one_class, torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    loss_fn = make(3, 4)
    assert finite_loss_and_grads(loss_fn, torch.randn(1, 4), torch.tensor([2]))
    duplicates = torch.randn(1, 4).repeat(6, 1)
    assert finite_loss_and_grads(loss_fn, duplicates, torch.tensor([0, 0, 1, 1, 2, 2]))


@pytest.mark.parametrize("make", ALL_MODULES)
def test_bf16_autocast_keeps_float32_weights(make):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 16)
    loss_fn = make(10, 16)
    x, y = torch.randn(12, 8), torch.randint(0, 10, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = model(x)
        assert embeddings.dtype == torch.bfloat16
        loss = loss_fn(embeddings, y)
    loss.float().backward()
    assert bool(torch.isfinite(loss))
    assert loss_fn.weight.dtype == torch.float32 and loss_fn.weight.grad.dtype == torch.float32
    assert bool(torch.isfinite(loss_fn.weight.grad).all())
    assert bool(torch.isfinite(model.weight.grad).all())
    # the loss computed in float32 from the bf16 embeddings, not in bf16
    expected = make(10, 16)
    expected.load_state_dict(loss_fn.state_dict())
    expected.train(False)
    loss_fn.train(False)
    torch.testing.assert_close(
        loss_fn(embeddings.detach(), y).float(),
        expected(embeddings.detach().float(), y).bfloat16().float(),
    )


def test_half_inputs_return_half():
    loss_fn = CosFaceLoss(3, 4)
    x = torch.randn(6, 4).half()
    loss = loss_fn(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert loss.dtype == torch.float16 and bool(torch.isfinite(loss))


def test_modules_move_with_to_and_cast():
    loss_fn = ArcFaceLoss(3, 4).to(torch.float64)
    assert loss_fn.weight.dtype == torch.float64
    loss = loss_fn(torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]))
    assert loss.dtype == torch.float64
    meta = ArcFaceLoss(3, 4).to("meta")
    assert meta.weight.device.type == "meta"


def test_non_contiguous_embeddings():
    torch.manual_seed(0)
    x, y, w = batch(3, n=6, dim=5)
    wide = torch.randn(5, 6, dtype=torch.float64).T  # (6, 5), not contiguous
    torch.testing.assert_close(
        cosface_loss(wide, y, weight=w, scale=4.0),
        cosface_loss(wide.contiguous(), y, weight=w, scale=4.0),
    )


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "make",
    [
        lambda: NormalizedSoftmaxLoss(3, 4),
        lambda: CosFaceLoss(3, 4),
        lambda: ArcFaceLoss(3, 4),
        lambda: SphereFaceLoss(3, 4),
        lambda: LargeMarginSoftmaxLoss(3, 4),
        lambda: HeatedUpSoftmaxLoss(3, 4, heat_up_at=1),
    ],
)
def test_bad_calls_fail_clearly(make):
    loss_fn = make()
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="num_classes=3"):
        loss_fn(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="embedding_size=4"):
        loss_fn(torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="class indices"):
        loss_fn(x, torch.tensor([0, -1, 2, 0]))
    with pytest.raises(TypeError, match="integers"):
        loss_fn(x, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="indices_tuple"):
        loss_fn(x, torch.tensor([0, 1, 2, 0]), indices_tuple=(torch.tensor([0]),) * 3)
    with pytest.raises(ValueError, match="ref_emb"):
        loss_fn(x, torch.tensor([0, 1, 2, 0]), ref_emb=x, ref_labels=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="labels are required"):
        loss_fn(x)
    with pytest.raises(ValueError, match="NaN"):
        loss_fn(torch.full((4, 4), float("nan")), torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: NormalizedSoftmaxLoss(3, 4, temperature=0.0), "temperature"),
        (lambda: NormalizedSoftmaxLoss(3, 4, temperature=-0.1), "temperature"),
        (lambda: CosFaceLoss(3, 4, scale=0.0), "scale"),
        (lambda: CosFaceLoss(3, 4, margin=-0.1), "margin"),
        (lambda: CosFaceLoss(3, 4, margin=1.5), "margin"),
        (lambda: ArcFaceLoss(3, 4, margin=28.6), "margin"),
        (lambda: ArcFaceLoss(3, 4, margin=-0.5), "margin"),
        (lambda: ArcFaceLoss(3, 4, scale=-64.0), "scale"),
        (lambda: SphereFaceLoss(3, 4, margin=0), "margin"),
        (lambda: SphereFaceLoss(3, 4, margin=2.5), "margin"),
        (lambda: LargeMarginSoftmaxLoss(3, 4, scale=0.0), "scale"),
        (lambda: HeatedUpSoftmaxLoss(3, 4, heat_up_at=1, initial_scale=0.0), "initial_scale"),
        (lambda: HeatedUpSoftmaxLoss(3, 4, heat_up_at=1, final_scale=-1.0), "final_scale"),
        (lambda: HeatedUpSoftmaxLoss(3, 4, heat_up_at=-1), "heat_up_at"),
        (lambda: NormalizedSoftmaxLoss(0, 4), "num_classes"),
        (lambda: NormalizedSoftmaxLoss(3, 0), "embedding_size"),
        (lambda: NormalizedSoftmaxLoss(3, 4, reduction="avg"), "reduction"),
    ],
)
def test_bad_hyper_parameters_name_the_argument(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


def test_functional_checks_arguments():
    x, y, w = batch(0)
    with pytest.raises(ValueError, match="temperature"):
        normalized_softmax_loss(x, y, weight=w, temperature=0)
    with pytest.raises(ValueError, match="lambda_"):
        large_margin_softmax_loss(x, y, weight=w, lambda_=-1.0)
    with pytest.raises(ValueError, match="num_classes=2"):
        arcface_loss(x, torch.full_like(y, 3), weight=w[:2])
