"""Proxy and centre losses against slow from-the-formula references (float64, explicit loops
over samples and classes), the survey's identities (eq. 14-17), the centre update, the
adaptive margin, param_groups, the numerics at the edges and the input checks."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric.distances import (
    CosineSimilarity,
    EuclideanDistance,
    MetricCosineDistance,
    SquaredEuclideanDistance,
)
from deepmetric.losses.additive_margin import (
    AdaptiveMargin,
    AdditiveMarginLoss,
    MarginEstimate,
    additive_margin_loss,
)
from deepmetric.losses.param_groups import param_groups
from deepmetric.losses.proxy import (
    CenterLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    center_loss,
    proxy_anchor_loss,
    proxy_nca_loss,
    update_centers,
)
from deepmetric.losses.softmax import cosface_loss, normalized_softmax_loss


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(seed, n=7, rows=4, dim=5, num_classes=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(rows, dim, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, num_classes or rows, (n,), generator=g)
    return x, y, p


# ---------------------------------------------------------------- slow references


def norm(v):
    return torch.sqrt(sum(v[k] * v[k] for k in range(len(v))))


def dot(a, b):
    return sum(a[k] * b[k] for k in range(len(a)))


def unit(v):
    return v / norm(v)


def sq_dist(a, b):
    return sum((a[k] - b[k]) ** 2 for k in range(len(a)))


def reduce_ref(terms, reduction):
    total = sum(terms)
    if reduction == "sum":
        return total
    if reduction == "nonzero_mean":
        return total / max(sum(1 for t in terms if t > 0), 1)
    return total / len(terms)


def proxy_nca_ref(x, y, proxies, scale, k, assignment, exclude, reduction="mean"):
    """Survey eq. 12-14 on normalised vectors, d = squared Euclidean distance."""
    num_classes = len(proxies) // k
    terms = []
    for i in range(len(x)):
        xi = unit(x[i])
        score = [torch.exp(-scale * sq_dist(xi, unit(proxies[r]))) for r in range(len(proxies))]
        own = [j * num_classes + int(y[i]) for j in range(k)]
        if assignment == "dynamic":
            nearest = min(own, key=lambda r: float(sq_dist(xi, unit(proxies[r])).detach()))
            positive = score[nearest]
        else:
            positive = sum(score[r] for r in own)
        negatives = [score[r] for r in range(len(proxies)) if r % num_classes != int(y[i])]
        if num_classes == 1:
            terms.append(0 * positive)
            continue
        denominator = sum(negatives) + (0 if exclude else positive)
        terms.append(-torch.log(positive / denominator))
    return reduce_ref(terms, reduction)


def proxy_anchor_ref(x, y, proxies, margin, alpha, reduction="mean"):
    """Kim et al. 2020, eq. 4, with explicit sums over proxies and samples."""
    pos_terms, neg_terms, with_positives = [], [], 0
    for c in range(len(proxies)):
        pc = unit(proxies[c])
        pos_sum = torch.zeros((), dtype=x.dtype)
        neg_sum = torch.zeros((), dtype=x.dtype)
        has = False
        for i in range(len(x)):
            s = dot(unit(x[i]), pc)
            if int(y[i]) == c:
                pos_sum = pos_sum + torch.exp(-alpha * (s - margin))
                has = True
            else:
                neg_sum = neg_sum + torch.exp(alpha * (s + margin))
        with_positives += has
        pos_terms.append(torch.log(1 + pos_sum))
        neg_terms.append(torch.log(1 + neg_sum))
    if reduction == "sum":
        return sum(pos_terms) + sum(neg_terms)
    if reduction == "nonzero_mean":
        pos_count = sum(1 for t in pos_terms if t > 0)
        neg_count = sum(1 for t in neg_terms if t > 0)
        return sum(pos_terms) / max(pos_count, 1) + sum(neg_terms) / max(neg_count, 1)
    return sum(pos_terms) / max(with_positives, 1) + sum(neg_terms) / len(proxies)


def center_ref(x, y, weight, bias, centers, lam, reduction="mean"):
    """Survey eq. 7 per sample: -log softmax(W x + b)_y + lam / 2 ||x - c_y||^2."""
    terms = []
    for i in range(len(x)):
        logits = [
            dot(weight[j], x[i]) + (0 if bias is None else bias[j]) for j in range(len(weight))
        ]
        ce = -logits[int(y[i])] + torch.log(sum(torch.exp(v) for v in logits))
        terms.append(ce + lam / 2 * sq_dist(x[i], centers[int(y[i])]))
    return reduce_ref(terms, reduction)


def additive_margin_ref(x, y, centers, margin, scale, d, reduction="mean"):
    """Seed 000 eq. 5: log(1 + sum_{i != y} exp(s (d(z, c_y) + m - d(z, c_i))))."""
    terms = []
    for i in range(len(x)):
        target = int(y[i])
        inner = 1 + sum(
            torch.exp(scale * (d(x[i], centers[target]) + margin - d(x[i], centers[j])))
            for j in range(len(centers))
            if j != target
        )
        terms.append(torch.log(inner))
    return reduce_ref(terms, reduction)


def euclidean(a, b):
    return torch.sqrt(sq_dist(a, b))


def negative_cosine(a, b):
    return -dot(unit(a), unit(b))


def unit_sq_dist(a, b):
    return sq_dist(unit(a), unit(b))


def metric_cosine(a, b):
    return torch.sqrt(1 - dot(unit(a), unit(b)))


def assert_same(fast, slow, inputs):
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-10)
    fast_grads = torch.autograd.grad(fast, inputs, retain_graph=True)
    slow_grads = torch.autograd.grad(slow, inputs)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- Proxy-NCA


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize(("k", "assignment"), [(1, "static"), (3, "static"), (3, "dynamic")])
def test_proxy_nca_matches_reference(seed, exclude, k, assignment):
    x, y, p = batch(seed, n=8, rows=4 * k, num_classes=4)
    fast = proxy_nca_loss(
        x,
        y,
        proxies=p,
        softmax_scale=1.7,
        proxies_per_class=k,
        assignment=assignment,
        exclude_positive=exclude,
    )
    assert_same(fast, proxy_nca_ref(x, y, p, 1.7, k, assignment, exclude), (x, p))


@pytest.mark.parametrize("reduction", ["sum", "nonzero_mean"])
def test_proxy_nca_reductions(reduction):
    x, y, p = batch(4, n=8, rows=4)
    fast = proxy_nca_loss(x, y, proxies=p, softmax_scale=0.5, reduction=reduction)
    assert_same(fast, proxy_nca_ref(x, y, p, 0.5, 1, "static", True, reduction), (x, p))


def test_dynamic_one_proxy_per_class_is_static():
    x, y, p = batch(1, n=8, rows=4)
    torch.testing.assert_close(
        proxy_nca_loss(x, y, proxies=p, assignment="dynamic"),
        proxy_nca_loss(x, y, proxies=p, assignment="static"),
    )


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_proxy_nca_with_positive_is_normalized_softmax(seed, scale):
    """Survey eq. 14-17: with unit vectors, d^2 = 2 - 2 x.p, so exp(-s d^2) is exp(2 s x.p)
    up to a constant: Proxy-NCA with the positive included is the normalised softmax with
    temperature 1 / (2 s), values and gradients."""
    x, y, p = batch(seed, n=9, rows=5)
    nca = proxy_nca_loss(x, y, proxies=p, softmax_scale=scale, exclude_positive=False)
    softmax = normalized_softmax_loss(x, y, weight=p, temperature=1 / (2 * scale))
    assert_same(nca, softmax, (x, p))


def test_proxy_nca_takes_any_distance():
    x, y, p = batch(2, n=6, rows=3)
    with_cosine = proxy_nca_loss(
        x, y, proxies=p, softmax_scale=4.0, exclude_positive=False, distance=CosineSimilarity()
    )
    torch.testing.assert_close(
        with_cosine, normalized_softmax_loss(x, y, weight=p, temperature=0.25)
    )
    raw = proxy_nca_loss(
        x, y, proxies=p, distance=SquaredEuclideanDistance(), exclude_positive=False
    )
    d2 = torch.cdist(x, p) ** 2
    torch.testing.assert_close(raw, F.cross_entropy(-d2, y))


def test_proxy_nca_one_class_is_zero_with_graph():
    x, _, p = batch(0, n=5, rows=2)
    y = torch.zeros(5, dtype=torch.long)
    for exclude in (True, False):
        loss = proxy_nca_loss(x, y, proxies=p, proxies_per_class=2, exclude_positive=exclude)
        assert float(loss.detach()) == 0.0
        (grad,) = torch.autograd.grad(loss, x)
        assert bool((grad == 0).all())


# ---------------------------------------------------------------- Proxy-Anchor


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("reduction", ["mean", "sum", "nonzero_mean"])
def test_proxy_anchor_matches_reference(seed, reduction):
    x, y, p = batch(seed, n=8, rows=5)  # some proxies have no positive in the batch
    fast = proxy_anchor_loss(x, y, proxies=p, margin=0.1, alpha=8.0, reduction=reduction)
    assert_same(fast, proxy_anchor_ref(x, y, p, 0.1, 8.0, reduction), (x, p))


def test_proxy_anchor_large_alpha_matches_reference():
    x, y, p = batch(7, n=6, rows=3)
    fast = proxy_anchor_loss(x, y, proxies=p, margin=0.2, alpha=64.0)
    assert_same(fast, proxy_anchor_ref(x, y, p, 0.2, 64.0), (x, p))


def test_proxy_anchor_one_class_has_no_negative_term():
    x, _, p = batch(3, n=5, rows=1)
    y = torch.zeros(5, dtype=torch.long)
    fast = proxy_anchor_loss(x, y, proxies=p, alpha=16.0)
    assert_same(fast, proxy_anchor_ref(x, y, p, 0.1, 16.0), (x, p))


# ---------------------------------------------------------------- centre loss


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_center_loss_matches_reference(seed, reduction, with_bias):
    x, y, w = batch(seed, n=8, rows=4)
    g = torch.Generator().manual_seed(seed + 100)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    c = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fast = center_loss(x, y, weight=w, bias=b, centers=c, center_weight=0.3, reduction=reduction)
    slow = center_ref(x, y, w, b, c, 0.3, reduction)
    inputs = (x, w, c) + ((b,) if with_bias else ())
    assert_same(fast, slow, inputs)


def test_update_centers_follows_the_paper():
    """delta c_j = sum_{y_i = j} (c_j - x_i) / (1 + n_j); c_j <- c_j - alpha delta c_j."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 2, 2, 2, 1, 0])
    expected = centers.clone()
    for j in range(4):
        members = [i for i in range(7) if int(y[i]) == j]
        delta = sum((centers[j] - x[i] for i in members), torch.zeros(3, dtype=torch.float64))
        expected[j] = centers[j] - 0.5 * delta / (1 + len(members))
    update_centers(centers, x, y, alpha=0.5)
    torch.testing.assert_close(centers, expected)
    assert bool((expected[3] == centers[3]).all())  # class 3 absent: unchanged


def test_center_loss_module_moves_centres_by_its_rule():
    torch.manual_seed(0)
    loss_fn = CenterLoss(3, 4, center_weight=0.1, alpha=0.5)
    names = {name for name, _ in loss_fn.named_parameters()}
    assert names == {"weight", "bias"}  # centres are a buffer, no optimizer moves them
    assert "centers" in loss_fn.state_dict()
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    before = loss_fn.centers.clone()
    expected_loss = center_loss(
        x, y, weight=loss_fn.weight, bias=loss_fn.bias, centers=before, center_weight=0.1
    )
    loss = loss_fn(x, y)
    torch.testing.assert_close(loss, expected_loss)  # the loss uses the centres before the move
    torch.testing.assert_close(loss_fn.centers, update_centers(before.clone(), x, y, 0.5))
    loss.backward()  # the in-place move does not break backward
    loss_fn.eval()
    moved = loss_fn.centers.clone()
    loss_fn(x, y)
    torch.testing.assert_close(loss_fn.centers, moved)


def test_center_loss_learned_centres_are_parameters():
    loss_fn = CenterLoss(3, 4, alpha=None, bias=False)
    assert {name for name, _ in loss_fn.named_parameters()} == {"weight", "centers"}
    loss_fn(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert loss_fn.centers.grad is not None


def test_center_loss_bf16_updates_float32_centres():
    torch.manual_seed(0)
    loss_fn = CenterLoss(5, 8)
    model = torch.nn.Linear(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model(torch.randn(10, 4)), torch.randint(0, 5, (10,)))
    loss.float().backward()
    assert loss_fn.centers.dtype == torch.float32 and bool(torch.isfinite(loss_fn.centers).all())
    assert loss_fn.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------- additive margin over a distance


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("distance", "d"),
    [
        (EuclideanDistance(), euclidean),
        (CosineSimilarity(), negative_cosine),
        (MetricCosineDistance(), metric_cosine),
        (SquaredEuclideanDistance(normalize_embeddings=True), unit_sq_dist),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_additive_margin_matches_seed_formula(seed, distance, d, reduction):
    x, y, c = batch(seed, n=7, rows=4)
    fast = additive_margin_loss(
        x, y, centers=c, margin=0.3, scale=2.5, distance=distance, reduction=reduction
    )
    slow = additive_margin_ref(x, y, c, 0.3, 2.5, d, reduction)
    assert_same(fast, slow, (x, c))


def test_additive_margin_with_cosine_is_cosface():
    x, y, c = batch(9, n=8, rows=5)
    assert_same(
        additive_margin_loss(x, y, centers=c, margin=0.35, scale=30.0, distance=CosineSimilarity()),
        cosface_loss(x, y, weight=c, margin=0.35, scale=30.0),
        (x, c),
    )


def test_additive_margin_stats_are_distances_to_own_centre():
    x, y, c = batch(1, n=6, rows=3)
    _, stats = additive_margin_loss(x, y, centers=c, margin=0.2, return_stats=True)
    expected = torch.stack([torch.dist(x[i], c[y[i]]) for i in range(6)]).detach()
    torch.testing.assert_close(stats.center_distance, expected)
    assert stats.margin == 0.2 and not stats.center_distance.requires_grad
    _, stats = additive_margin_loss(x, y, centers=c, distance=CosineSimilarity(), return_stats=True)
    expected = torch.stack([negative_cosine(x[i], c[y[i]]) for i in range(6)]).detach()
    torch.testing.assert_close(stats.center_distance, -expected)


# ---------------------------------------------------------------- adaptive margin


def test_adaptive_margin_starts_at_zero_and_tracks_the_diameter(caplog):
    schedule = AdaptiveMargin(update_every=3)
    assert schedule.margin == 0.0
    observed = [torch.tensor([1.0, 2.0]), torch.tensor([3.0]), torch.tensor([0.5, 0.5, 2.0])]
    with caplog.at_level(logging.INFO, logger="deepmetric.losses.additive_margin"):
        results = []
        for values in observed:
            schedule.observe(values)
            results.append(schedule.step())
    mean = (1 + 2 + 3 + 0.5 + 0.5 + 2) / 6
    assert results[:2] == [None, None]
    assert results[2] == MarginEstimate(
        step=3, mean_center_distance=mean, margin=2 * mean, num_samples=6
    )
    assert schedule.margin == pytest.approx(2 * mean)
    assert schedule.history == [results[2]]
    assert "adaptive margin" in caplog.text
    # the next estimate uses only what was observed after this one
    for _ in range(3):
        schedule.observe(torch.tensor([0.25]))
        schedule.step()
    assert schedule.margin == pytest.approx(0.5)


def test_adaptive_margin_bound_and_state():
    schedule = AdaptiveMargin(update_every=1, diameter_factor=2.0, max_margin=0.3)
    schedule.observe(torch.tensor([1.0]))
    schedule.step()
    assert schedule.margin == 0.3
    copy = AdaptiveMargin(update_every=1)
    copy.load_state_dict(schedule.state_dict())
    assert copy.margin == 0.3 and copy.history == schedule.history and copy.num_steps == 1
    assert AdaptiveMargin(update_every=1).step() is None  # nothing observed: m unchanged


def test_additive_margin_loss_drives_the_adaptive_margin():
    torch.manual_seed(0)
    schedule = AdaptiveMargin(update_every=2)
    loss_fn = AdditiveMarginLoss(3, 4, margin=schedule, scale=2.0)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    first = loss_fn(x, y)
    torch.testing.assert_close(
        first, additive_margin_loss(x, y, centers=loss_fn.centers, margin=0.0, scale=2.0)
    )
    loss_fn(x, y)
    expected = 2 * torch.cdist(x, loss_fn.centers.detach()).gather(1, y[:, None]).mean()
    assert schedule.margin == pytest.approx(float(expected), rel=1e-5)
    assert loss_fn.current_margin == schedule.margin
    torch.testing.assert_close(
        loss_fn(x, y),
        additive_margin_loss(x, y, centers=loss_fn.centers, margin=schedule.margin, scale=2.0),
    )
    restored = AdditiveMarginLoss(3, 4, margin=AdaptiveMargin(update_every=2), scale=2.0)
    restored.load_state_dict(loss_fn.state_dict())
    assert restored.current_margin == schedule.margin
    loss_fn.eval()
    steps = schedule.num_steps
    loss_fn(x, y)
    assert schedule.num_steps == steps
    with pytest.raises(ValueError, match="similarity"):
        AdditiveMarginLoss(3, 4, margin=AdaptiveMargin(), distance=CosineSimilarity())


# ---------------------------------------------------------------- param_groups


def test_param_groups_give_the_loss_its_own_learning_rate():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4))
    model[0].bias.requires_grad_(False)
    loss_fn = ProxyAnchorLoss(3, 4)
    groups = param_groups(model, loss_fn, lr=1e-3, loss_lr=0.1, weight_decay=1e-4)
    optimizer = torch.optim.SGD(groups)
    model_group, loss_group = optimizer.param_groups
    assert model_group["lr"] == 1e-3 and model_group["weight_decay"] == 1e-4
    assert loss_group["lr"] == 0.1 and loss_group["weight_decay"] == 0.0
    assert loss_group["params"][0] is loss_fn.proxies
    assert len(model_group["params"]) == 1  # the frozen bias is left out
    before = loss_fn.proxies.detach().clone()
    loss_fn(model(torch.randn(5, 6)), torch.tensor([0, 1, 2, 0, 1])).backward()
    optimizer.step()
    assert not torch.equal(before, loss_fn.proxies.detach())
    assert [g["name"] for g in param_groups(model, CenterLoss(3, 4, bias=False), lr=1.0)] == [
        "model",
        "loss",
    ]
    with pytest.raises(ValueError, match="loss_lr"):
        param_groups(model, loss_fn, lr=1e-3, loss_lr=0.0)
    with pytest.raises(ValueError, match="both"):
        param_groups(loss_fn, loss_fn, lr=1.0)


# ---------------------------------------------------------------- numerics and edges


ALL_MODULES = [
    lambda c, d: ProxyNCALoss(c, d, softmax_scale=64.0),
    lambda c, d: ProxyNCALoss(c, d, softmax_scale=8.0, exclude_positive=False),
    lambda c, d: ProxyNCALoss(c, d, proxies_per_class=3, assignment="dynamic", softmax_scale=32.0),
    lambda c, d: ProxyNCALoss(c, d, proxies_per_class=2, softmax_scale=32.0),
    lambda c, d: ProxyAnchorLoss(c, d, alpha=128.0),
    lambda c, d: CenterLoss(c, d, center_weight=0.5),
    lambda c, d: AdditiveMarginLoss(c, d, margin=0.5, scale=64.0),
    lambda c, d: AdditiveMarginLoss(c, d, margin=0.3, scale=128.0, distance=CosineSimilarity()),
    lambda c, d: AdditiveMarginLoss(c, d, margin=AdaptiveMargin(update_every=1), scale=32.0),
]


def finite_loss_and_grads(loss_fn, x, y):
    x = x.clone().requires_grad_()
    loss = loss_fn(x, y)
    loss.backward()
    grads = [x.grad] + [p.grad for p in loss_fn.parameters()]
    return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("make", ALL_MODULES)
def test_edges_are_finite(make):
    torch.manual_seed(0)
    assert finite_loss_and_grads(make(1, 4), torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    assert finite_loss_and_grads(make(3, 4), torch.randn(1, 4), torch.tensor([1]))
    duplicates = torch.randn(1, 4).repeat(6, 1)
    assert finite_loss_and_grads(make(3, 4), duplicates, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert finite_loss_and_grads(
        make(50, 16), torch.randn(40, 16) * 1e3, torch.randint(0, 50, (40,))
    )
    loss_fn = make(3, 4)
    at_vectors = next(iter(loss_fn.parameters())).detach()[:3]  # x on its class vectors
    assert finite_loss_and_grads(
        loss_fn, torch.cat([at_vectors, -at_vectors]), torch.tensor([0, 1, 2] * 2)
    )


@pytest.mark.parametrize("make", ALL_MODULES)
def test_bf16_autocast_is_finite_and_float32(make):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 16)
    loss_fn = make(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = model(torch.randn(12, 8))
        loss = loss_fn(embeddings, torch.randint(0, 10, (12,)))
    loss.float().backward()
    assert bool(torch.isfinite(loss))
    for parameter in loss_fn.parameters():
        assert parameter.dtype == torch.float32 and parameter.grad.dtype == torch.float32
        assert bool(torch.isfinite(parameter.grad).all())
    assert bool(torch.isfinite(model.weight.grad).all())


def test_modules_move_with_to():
    loss_fn = ProxyNCALoss(3, 4).to(torch.float64)
    assert loss_fn.proxies.dtype == torch.float64
    center = CenterLoss(3, 4).to("meta")
    assert center.centers.device.type == "meta" and center.weight.device.type == "meta"


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "make",
    [
        lambda: ProxyNCALoss(3, 4),
        lambda: ProxyNCALoss(3, 4, proxies_per_class=2, assignment="dynamic"),
        lambda: ProxyAnchorLoss(3, 4),
        lambda: CenterLoss(3, 4),
        lambda: AdditiveMarginLoss(3, 4),
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
    with pytest.raises(ValueError, match="indices_tuple"):
        loss_fn(x, torch.tensor([0, 1, 2, 0]), indices_tuple=(torch.tensor([0]),) * 3)
    with pytest.raises(ValueError, match="ref_emb"):
        loss_fn(x, torch.tensor([0, 1, 2, 0]), ref_emb=x, ref_labels=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="labels has 3 entries"):
        loss_fn(x, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: ProxyNCALoss(3, 4, softmax_scale=0.0), "softmax_scale"),
        (lambda: ProxyNCALoss(3, 4, proxies_per_class=0), "proxies_per_class"),
        (lambda: ProxyNCALoss(3, 4, assignment="nearest"), "assignment"),
        (lambda: ProxyAnchorLoss(3, 4, alpha=0.0), "alpha"),
        (lambda: ProxyAnchorLoss(3, 4, margin=-0.1), "margin"),
        (lambda: CenterLoss(3, 4, center_weight=-1.0), "center_weight"),
        (lambda: CenterLoss(3, 4, alpha=1.5), "alpha"),
        (lambda: CenterLoss(3, 4, alpha=0.0), "alpha"),
        (lambda: AdditiveMarginLoss(3, 4, margin=-0.2), "margin"),
        (lambda: AdditiveMarginLoss(3, 4, scale=0.0), "scale"),
        (lambda: AdaptiveMargin(update_every=0), "update_every"),
        (lambda: AdaptiveMargin(diameter_factor=0.0), "diameter_factor"),
        (lambda: ProxyNCALoss(0, 4), "num_classes"),
        (lambda: ProxyAnchorLoss(3, -1), "embedding_size"),
    ],
)
def test_bad_hyper_parameters_name_the_argument(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


def test_functional_shape_checks():
    x, y, p = batch(0, n=6, rows=6)
    with pytest.raises(ValueError, match="proxies_per_class=4"):
        proxy_nca_loss(x, y, proxies=p, proxies_per_class=4)
    with pytest.raises(ValueError, match="centers has shape"):
        center_loss(x, y, weight=p, centers=p[:2])
    with pytest.raises(ValueError, match="bias"):
        center_loss(x, y, weight=p, bias=torch.zeros(2, dtype=torch.float64), centers=p)
    with pytest.raises(ValueError, match="alpha"):
        update_centers(p.detach().clone(), x, y, alpha=2.0)


def test_margins_are_not_degrees():
    """ArcFace-style angles are radians everywhere; 28.6 (pml's degrees) is rejected."""
    from deepmetric.losses.softmax import ArcFaceLoss

    with pytest.raises(ValueError, match="radians"):
        ArcFaceLoss(3, 4, margin=28.6)
    assert ArcFaceLoss(3, 4).margin == pytest.approx(math.radians(28.6), abs=1e-3)
