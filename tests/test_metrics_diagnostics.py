"""Seed 000's diagnostic (classification is not ranking) against a slow reference."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

from deepmetric.index import NeighbourIndex
from deepmetric.metrics import evaluate, margin_diagnostics


def slow_diagnostics(query, query_labels, reference, reference_labels, distance, self_search):
    """From the definitions, with Python loops over samples and classes."""
    query = [np.asarray(q, dtype=np.float64) for q in query]
    reference = [np.asarray(r, dtype=np.float64) for r in reference]
    if distance == "cosine":
        query = [q / np.linalg.norm(q) for q in query]
        reference = [r / np.linalg.norm(r) for r in reference]

    def d(a, b):
        if distance == "euclidean":
            return math.dist(a, b)
        return math.sqrt(max(0.0, 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))))

    classes = sorted(set(reference_labels))
    centres = {}
    for c in classes:
        members = [r for r, y in zip(reference, reference_labels, strict=True) if y == c]
        centres[c] = np.mean(members, axis=0)
    counts = {c: list(reference_labels).count(c) for c in classes}
    right, right_nn_wrong, spread, used = 0, 0, [], 0
    for i, (q, y) in enumerate(zip(query, query_labels, strict=True)):
        if counts.get(y, 0) < 1 + int(self_search):
            continue
        used += 1
        to_centre = {c: d(q, centres[c]) for c in classes}
        nearest_centre = min(classes, key=lambda c: (to_centre[c], c))
        ranked = sorted(
            (float(((q - r) ** 2).sum()) if distance == "euclidean" else -float(q @ r), j)
            for j, r in enumerate(reference)
            if not (self_search and j == i)
        )
        nn_label = reference_labels[ranked[0][1]]
        right += nearest_centre == y
        right_nn_wrong += nearest_centre == y and nn_label != y
        others = [to_centre[c] for c in classes if c != y]
        if others:
            spread.append(to_centre[y] + min(others))
    radii = [d(r, centres[y]) for r, y in zip(reference, reference_labels, strict=True)
             if counts[y] >= 2]  # fmt: skip
    diameter = 2 * float(np.mean(radii))
    out = {
        "nearest_centre_accuracy": right / used,
        "centre_right_nn_wrong": right_nn_wrong / used,
        "class_diameter": diameter,
        "suggested_margin": diameter,
    }
    if distance == "cosine":
        out["suggested_cosine_margin"] = diameter * float(np.mean(spread))
    return out


def test_the_seed_picture():
    # Class a: z1 = 1.0, z3 = -1.0 (centre 0); class b: z2 = 1.6, z4 = 3.4 (centre 2.5).
    # z1 is closer to its centre (1.0) than to b's (1.5), yet its nearest neighbour is z2;
    # the same holds for z2. Radii 1, 1, 0.9, 0.9, so the mean class diameter is 1.9.
    x = np.array([[1.0], [-1.0], [1.6], [3.4]])
    labels = ["a", "a", "b", "b"]
    found = NeighbourIndex()
    found.add(x, labels=labels)
    neighbours = found.search(x, 1, exclude=np.arange(4))
    result = margin_diagnostics(x, labels, neighbours)
    assert result["nearest_centre_accuracy"] == 1.0
    assert result["centre_right_nn_wrong"] == 0.5
    assert result["class_diameter"] == pytest.approx(1.9)
    assert result["suggested_margin"] == pytest.approx(1.9)
    # With that margin z1 would need d(z1, c1) + m = 2.9 < d(z1, c2) = 1.5: it is violated.


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("separate", [False, True])
def test_matches_slow_reference(distance, separate):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=80)
    x = (rng.standard_normal((5, 6))[labels] + 0.8 * rng.standard_normal((80, 6))).astype(
        np.float32
    )
    labels[-1] = 99  # a class with one member
    if separate:
        query, query_labels = x[:30], labels[:30]
        reference, reference_labels = x[30:], labels[30:]
    else:
        query, query_labels, reference, reference_labels = x, labels, None, None
    with pytest.warns(UserWarning) if not separate else contextlib.nullcontext():
        result = evaluate(query, query_labels, reference, reference_labels,
                          metrics=("diagnostics",), distance=distance)  # fmt: skip
    expected = slow_diagnostics(
        query,
        list(query_labels),
        x if reference is None else reference,
        list(labels if reference is None else reference_labels),
        distance,
        self_search=not separate,
    )
    assert set(result) == {"num_queries", "num_skipped", *expected}
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_dot_product_is_refused():
    with pytest.raises(ValueError, match="metric distance"):
        evaluate(np.eye(3), [0, 0, 1], metrics=("diagnostics",), distance="dot")
