"""k-NN classification: majority vote against a slow reference, ties, missing neighbours."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmetric.index import Neighbours
from deepmetric.metrics import knn_accuracy, knn_predict


def slow_predict(labels_row, k):
    """Most frequent label among the first k; a tie goes to the label seen first."""
    votes = Counter(labels_row[:k])
    best = max(votes.values())
    return next(label for label in labels_row[:k] if votes[label] == best)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.lists(st.integers(0, 3), min_size=6, max_size=6), min_size=1, max_size=20),
    k=st.integers(1, 6),
)
def test_majority_vote_matches_slow_reference(labels, k):
    labels = np.array(labels)
    found = Neighbours(np.tile(np.arange(6), (len(labels), 1)), np.zeros(labels.shape), labels)
    expected = [slow_predict(list(row), k) for row in labels]
    assert knn_predict(found, k).tolist() == expected
    truth = labels[:, 0]
    accuracy = np.mean([e == t for e, t in zip(expected, truth, strict=True)])
    assert knn_accuracy(found, truth, k) == pytest.approx(accuracy)


def test_vote_ties_go_to_the_nearest_label_and_strings_work():
    found = Neighbours(np.array([[0, 1, 2, 3]]), np.zeros((1, 4)), np.array([["b", "a", "a", "b"]]))
    assert knn_predict(found, 4).tolist() == ["b"]
    assert knn_predict(found, 3).tolist() == ["a"]
    assert knn_accuracy(found, ["b"], k=4) == 1.0


def test_missing_neighbours_do_not_vote():
    found = Neighbours(np.array([[5, -1, -1]]), np.array([[0.1, np.inf, np.inf]]),
                       np.array([[2, 9, 9]]))  # fmt: skip
    assert knn_predict(found, 3).tolist() == [2]


def test_valid_mask_and_macro_average():
    labels = np.array([[0], [1], [1], [0]])
    found = Neighbours(np.arange(4)[:, None], np.zeros((4, 1)), labels)
    truth = np.array([0, 1, 0, 0])
    assert knn_accuracy(found, truth, k=1) == 0.75
    assert knn_accuracy(found, truth, k=1, valid=[False, False, True, False]) == 0.0
    # class 0 (queries 0, 2, 3): right, wrong, right -> 2/3; class 1: right -> 1
    assert knn_accuracy(found, truth, k=1, average="macro") == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="search deeper"):
        knn_accuracy(found, truth, k=2)
