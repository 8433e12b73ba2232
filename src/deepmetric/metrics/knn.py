"""k-nearest-neighbour classification: majority vote among the first K neighbours."""

from __future__ import annotations

from typing import Any

import numpy as np

from deepmetric.metrics._inputs import as_labels, check_ks, equal_labels
from deepmetric.metrics.labels import is_multi_hot
from deepmetric.metrics.retrieval import average_over_queries
from deepmetric.neighbours import Neighbours

__all__ = ["knn_accuracy", "knn_predict"]

_BLOCK_ENTRIES = 1 << 22
_ONE_CLASS = (
    "k-NN accuracy needs one class per row (a vote elects one label); with multi-hot labels "
    "use the retrieval metrics (precision@1, map@r, ...)"
)


def _vote_positions(labels: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Per row, the position j whose label wins the vote (ties: the earliest position)."""
    winners = np.empty(len(labels), dtype=np.int64)
    k = labels.shape[1]
    rows = max(1, _BLOCK_ENTRIES // max(k * k, 1))
    for start in range(0, len(labels), rows):
        block = labels[start : start + rows]
        present = found[start : start + rows]
        same = (block[:, :, None] == block[:, None, :]) & present[:, None, :]
        votes = np.where(present, same.sum(axis=2), -1)
        winners[start : start + rows] = votes.argmax(axis=1)
    return winners


def knn_predict(neighbours: Neighbours, k: int = 5) -> np.ndarray:
    """Predicted label of each query: the most frequent label among its first k neighbours.

    y_hat_i = argmax_c #{j <= k : labels[i, j] = c} (Cover, Hart 1967); a tie between labels
    goes to the label that occurs first in the ranking (the nearest). Missing neighbours
    (index -1) do not vote; a query with no neighbour at all gets the label at position 0.

    Parameters:
        neighbours: k-NN result with labels, at least k columns.
        k: number of voting neighbours.

    Example:
        >>> nb = Neighbours(np.array([[4, 5, 6]]), np.zeros((1, 3)), np.array([["a", "b", "b"]]))
        >>> knn_predict(nb, k=3).tolist(), knn_predict(nb, k=2).tolist()
        (['b'], ['a'])
    """
    (k,) = check_ks(k)
    if neighbours.labels is None:
        raise ValueError("neighbours carries no labels; call neighbours.with_labels(...)")
    if neighbours.multi_label:
        raise ValueError(_ONE_CLASS)
    if k > neighbours.k:
        raise ValueError(f"k={k} but neighbours has only k={neighbours.k}; search deeper")
    labels = neighbours.labels[:, :k]
    winners = _vote_positions(labels, neighbours.indices[:, :k] >= 0)
    return labels[np.arange(len(labels)), winners]


def knn_accuracy(
    neighbours: Neighbours,
    query_labels: Any,
    k: int = 5,
    *,
    valid: Any = None,
    average: str = "micro",
) -> float:
    """k-NN classification accuracy: share of queries whose majority-vote label is right.

    acc = mean_i [knn_predict(i) == y_i] over the queries in ``valid`` (by default all; the
    evaluation skips queries whose class has no reference, as for the retrieval metrics).

    Parameters:
        neighbours: k-NN result with labels.
        query_labels: (num_queries,) labels.
        k: number of voting neighbours.
        valid: optional (num_queries,) boolean mask of queries to count.
        average: "micro" (over queries) or "macro" (over classes).

    Example:
        >>> nb = Neighbours(np.array([[4, 5, 6]]), np.zeros((1, 3)), np.array([[1, 2, 2]]))
        >>> knn_accuracy(nb, [2], k=3)
        1.0
    """
    (k,) = check_ks(k)
    if is_multi_hot(query_labels):
        raise ValueError(_ONE_CLASS)
    query_labels = as_labels(query_labels, neighbours.num_queries, "query_labels", "neighbours")
    predicted = knn_predict(neighbours, k)
    correct = equal_labels(predicted, query_labels) & (neighbours.indices[:, 0] >= 0)
    return average_over_queries(correct, query_labels, valid, average)
