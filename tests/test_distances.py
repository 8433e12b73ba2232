from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import cosine, lp, pairwise_matrix

from deepmetric import distances as dist


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


NAIVE = {
    "euclidean": (dist.EuclideanDistance(), lp(2)),
    "squared": (dist.SquaredEuclideanDistance(), lp(2, 2)),
    "manhattan": (dist.ManhattanDistance(), lp(1)),
    "chebyshev": (dist.ChebyshevDistance(), lp(math.inf)),
    "lp3": (dist.LpDistance(p=3), lp(3)),
    "lp3_power2": (dist.LpDistance(p=3, power=2), lp(3, 2)),
    "dot": (dist.DotProductSimilarity(), lambda a, b: a @ b),
    "cosine": (dist.CosineSimilarity(), cosine),
    "cosine_distance": (dist.CosineDistance(), lambda a, b: 1 - cosine(a, b)),
    "metric_cosine": (dist.MetricCosineDistance(), lambda a, b: (1 - cosine(a, b)).sqrt()),
    "chord": (dist.MetricCosineDistance(chord=True), lambda a, b: (2 - 2 * cosine(a, b)).sqrt()),
}
METRICS = ["euclidean", "manhattan", "chebyshev", "lp3", "metric_cosine", "chord"]


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_matrix_and_pairwise_match_the_definition(name):
    distance, naive = NAIVE[name]
    torch.manual_seed(0)
    q, r = randn(7, 5), randn(4, 5)
    expected = pairwise_matrix(naive, q, r)
    torch.testing.assert_close(distance(q, r), expected)
    torch.testing.assert_close(
        distance.pairwise_distance(q, r[[0, 1, 2, 3, 0, 1, 2]]),
        expected[torch.arange(7), torch.tensor([0, 1, 2, 3, 0, 1, 2])],
    )
    torch.testing.assert_close(distance(q), pairwise_matrix(naive, q, q), atol=1e-7, rtol=1e-7)


def test_normalize_embeddings_option():
    torch.manual_seed(0)
    q, r = randn(5, 3) * 4, randn(6, 3) * 4
    unit = dist.EuclideanDistance(normalize_embeddings=True)(q, r)
    expected = pairwise_matrix(
        lp(2), q / q.norm(dim=1, keepdim=True), r / r.norm(dim=1, keepdim=True)
    )
    torch.testing.assert_close(unit, expected)
    assert not torch.allclose(dist.EuclideanDistance()(q, r), expected)


def test_chord_is_euclidean_of_unit_vectors():
    torch.manual_seed(1)
    q = randn(6, 4)
    chord = dist.MetricCosineDistance(chord=True)(q)
    unit = dist.EuclideanDistance(normalize_embeddings=True)(q)
    torch.testing.assert_close(chord, unit, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_gradients_are_finite_at_zero_distance(name):
    distance, _ = NAIVE[name]
    torch.manual_seed(2)
    base = randn(4, 3)
    x = torch.cat([base, base[:2], base[:1]]).requires_grad_()
    (grad,) = torch.autograd.grad(distance(x).sum(), x)
    assert torch.isfinite(grad).all()
    (grad,) = torch.autograd.grad(distance.pairwise_distance(x, x.flip(0)).sum(), x)
    assert torch.isfinite(grad).all()


def test_gradient_of_euclidean_matches_finite_differences():
    torch.manual_seed(3)
    q = randn(5, 3).requires_grad_()
    r = randn(4, 3).requires_grad_()
    for distance in (dist.EuclideanDistance(), dist.LpDistance(p=3), dist.MetricCosineDistance()):
        assert torch.autograd.gradcheck(lambda a, b, d=distance: d(a, b), (q, r))


def test_similarities_are_inverted_and_distances_not():
    assert dist.CosineSimilarity().is_inverted and dist.DotProductSimilarity().is_inverted
    assert not dist.EuclideanDistance().is_inverted and not dist.CosineDistance().is_inverted
    assert dist.EuclideanDistance().margin(1.0, 3.0) == -2.0
    assert dist.CosineSimilarity().margin(0.9, 0.2) == pytest.approx(-0.7)


points = st.lists(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=3, max_size=3), min_size=3, max_size=3
)


@pytest.mark.parametrize("name", METRICS)
@settings(max_examples=40, deadline=None)
@given(points)
def test_metric_axioms(name, xyz):
    distance, _ = NAIVE[name]
    x = torch.tensor(xyz, dtype=torch.float64)
    if "cosine" in name or name == "chord":
        x = x + torch.tensor(
            [0.5, 0.1, -0.3], dtype=torch.float64
        )  # keep away from the zero vector
    d = distance(x)
    tol = 1e-6 * (1 + d.abs().max())
    assert (d >= -tol).all()
    assert d.diagonal().abs().max() <= 1e-6
    torch.testing.assert_close(d, d.T)
    for i in range(3):
        for j in range(3):
            for k in range(3):
                assert d[i, k] <= d[i, j] + d[j, k] + tol


def test_one_minus_cosine_breaks_the_triangle_inequality_and_its_root_does_not():
    angle = torch.tensor([0.0, math.pi / 4, math.pi / 2], dtype=torch.float64)
    x = torch.stack([angle.cos(), angle.sin()], dim=1)
    d = dist.CosineDistance()(x)
    assert d[0, 2] > d[0, 1] + d[1, 2]  # 1 > 2 (1 - cos 45°) = 0.586
    root = dist.MetricCosineDistance()(x)
    assert root[0, 2] <= root[0, 1] + root[1, 2]
    assert not dist.CosineDistance().is_metric and dist.MetricCosineDistance().is_metric


def test_mahalanobis_is_the_quadratic_form_with_a_psd_matrix():
    torch.manual_seed(4)
    distance = dist.MahalanobisDistance(4, rank=3).double()
    with torch.no_grad():
        distance.projection.copy_(randn(3, 4))
    m = distance.metric_matrix
    assert torch.linalg.eigvalsh(m).min() > -1e-10
    q, r = randn(5, 4), randn(6, 4)
    expected = pairwise_matrix(lambda a, b: (a - b) @ m @ (a - b), q, r)
    torch.testing.assert_close(distance(q, r), expected)
    rooted = dist.MahalanobisDistance(4, rank=3, squared=False).double()
    rooted.load_state_dict(distance.state_dict())
    torch.testing.assert_close(rooted(q, r), expected.sqrt())
    loss = distance(q, r).sum()
    loss.backward()
    assert distance.projection.grad is not None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: dist.EuclideanDistance()(randn(3, 4), randn(3, 5)), "same space"),
        (lambda: dist.EuclideanDistance()(randn(3)), "2-D"),
        (lambda: dist.LpDistance(p=0), "p must be > 0"),
        (lambda: dist.LpDistance(power=-1), "power must be > 0"),
        (lambda: dist.MahalanobisDistance(4)(randn(2, 3)), "embedding_dim=4"),
        (
            lambda: dist.EuclideanDistance().pairwise_distance(randn(3, 2), randn(2, 2)),
            "row-aligned",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_float32_matrix_is_close_to_float64():
    torch.manual_seed(5)
    q = randn(50, 16)
    exact = dist.EuclideanDistance()(q)
    fast = dist.EuclideanDistance()(q.float()).double()
    assert (fast.diagonal() == 0).all()
    torch.testing.assert_close(fast, exact, atol=1e-4, rtol=1e-4)
