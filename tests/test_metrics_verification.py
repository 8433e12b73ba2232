"""Verification on pairs against slow references that loop over thresholds and pairs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmetric.metrics import evaluate, sample_pairs, verification_metrics


def slow_verification(scores, is_same, far):
    """From the definitions: "same" when score >= t, for every distinct t (and +inf)."""
    scores, is_same = np.asarray(scores, float), np.asarray(is_same, bool)
    positive, negative = scores[is_same], scores[~is_same]
    wins = sum(float(p > n) + 0.5 * float(p == n) for p in positive for n in negative)
    thresholds = [np.inf] + sorted(set(scores.tolist()), reverse=True)
    tar = [float(np.mean(positive >= t)) for t in thresholds]
    fa = [float(np.mean(negative >= t)) for t in thresholds]
    eer = None
    for i, (a, r) in enumerate(zip(fa, tar, strict=True)):
        fr = 1.0 - r
        if a >= fr:
            if i == 0 or a == fr:
                eer = a
            else:
                before = fa[i - 1] - (1.0 - tar[i - 1])
                step = -before / ((a - fr) - before)
                eer = fa[i - 1] + step * (a - fa[i - 1])
            break
    accuracy = [(r * len(positive) + (1 - a) * len(negative)) / len(scores)
                for r, a in zip(tar, fa, strict=True)]  # fmt: skip
    best = int(np.argmax(accuracy))
    out = {"roc_auc": wins / (len(positive) * len(negative)), "eer": eer}
    for f in far:
        out[f"tar@far={f:g}"] = max(r for r, a in zip(tar, fa, strict=True) if a <= f)
    out["best_threshold"] = thresholds[best]
    out["best_accuracy"] = accuracy[best]
    return out


@settings(max_examples=80, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=40),
    far=st.lists(st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5, 1.0]), min_size=1, max_size=3),
)
def test_matches_slow_reference(pairs, far):
    # Few distinct integer scores: many ties between and within the two kinds of pairs.
    scores = np.array([s for s, _ in pairs], dtype=float)
    is_same = np.array([same for _, same in pairs])
    if is_same.all() or not is_same.any():
        return
    ours = verification_metrics(scores, is_same, far=far)
    expected = slow_verification(scores, is_same, far)
    assert list(ours) == list(expected)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name


def test_known_values():
    perfect = verification_metrics([0.9, 0.8, 0.3, 0.1], [True, True, False, False], far=(0.0,))
    assert perfect == {"roc_auc": 1.0, "eer": 0.0, "tar@far=0": 1.0, "best_threshold": 0.8,
                       "best_accuracy": 1.0}  # fmt: skip
    chance = verification_metrics([1.0] * 4, [True, False, True, False])
    assert chance["roc_auc"] == 0.5 and chance["eer"] == 0.5


def test_distances_with_higher_is_same_false():
    distances = np.array([0.1, 0.4, 0.2, 0.9, 0.7])
    is_same = np.array([True, False, True, False, True])
    as_distance = verification_metrics(distances, is_same, higher_is_same=False)
    as_similarity = verification_metrics(-distances, is_same)
    assert as_distance["best_threshold"] == -as_similarity["best_threshold"]
    as_distance.pop("best_threshold"), as_similarity.pop("best_threshold")
    assert as_distance == as_similarity


def test_errors():
    with pytest.raises(ValueError, match="both kinds"):
        verification_metrics([0.1, 0.2], [True, True])
    with pytest.raises(TypeError, match="booleans"):
        verification_metrics([0.1, 0.2], [1, 0])
    with pytest.raises(ValueError, match="far"):
        verification_metrics([0.1, 0.2], [True, False], far=(2.0,))


def test_sample_pairs_are_labelled_right_and_never_self():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=300)
    q, r, same = sample_pairs(labels, labels, 1000, seed=1, exclude_self=True)
    assert same.sum() == 1000 and (~same).sum() == 1000
    np.testing.assert_array_equal(labels[q] == labels[r], same)
    assert not (q == r).any()
    again = sample_pairs(labels, labels, 1000, seed=1, exclude_self=True)
    for a, b in zip((q, r, same), again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_evaluate_reports_verification_keys():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 20)
    x = 30 * rng.standard_normal((5, 4))[labels] + rng.standard_normal((100, 4))
    result = evaluate(x, labels, metrics=("verification",), num_pairs=500, far=(1e-3,))
    assert list(result) == ["roc_auc", "eer", "tar@far=0.001", "best_threshold", "best_accuracy"]
    assert result["roc_auc"] == 1.0 and result["eer"] == 0.0 and result["best_accuracy"] == 1.0
    cosine = evaluate(x, labels, metrics=("verification",), num_pairs=500, distance="cosine")
    assert -1.0 <= cosine["best_threshold"] <= 1.0
