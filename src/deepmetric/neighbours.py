"""The result of a k-NN search: `Neighbours`, an immutable value that checks itself.

Tie rule (exact search): neighbours are ordered by distance, and references at the same
distance by ascending reference index. The set of k neighbours follows the same rule: when
the k-th and the (k+1)-th candidates are at the same distance, the references with the lowest
indices among those at that distance are kept. "Same distance" means equal computed float32
values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["METRICS", "Neighbours"]

METRICS = ("l2", "ip")


@dataclass(frozen=True, eq=False)
class Neighbours:
    """The k nearest references of each query, as one read-only value.

    Row ``i`` lists the references closest to query ``i``, closest first: ``indices[i, j]`` is
    the position of the j-th neighbour in the reference set, ``distances[i, j]`` its distance
    and ``labels[i, j]`` its label. Distances are squared Euclidean for ``metric="l2"`` and
    the negated inner product ``-<q, r>`` for ``metric="ip"``, so smaller is always closer.
    Ties are ordered by ascending reference index. An approximate index may find fewer than k
    references; missing entries have index -1 and distance +inf and sit at the end of the row
    (their ``labels`` entries are meaningless; metrics mask them by ``indices >= 0``).

    The constructor checks the invariants (shapes, sorted rows, unique indices per row) and
    stores read-only copies, in the spirit of open-metric-learning's retrieval results.

    Parameters:
        indices: (num_queries, k) integer reference positions, -1 for "none found".
        distances: (num_queries, k) float distances, non-decreasing along each row.
        labels: optional labels of the neighbours: (num_queries, k) class labels of any
            dtype, or (num_queries, k, num_labels) multi-hot rows (booleans or 0/1).
        metric: "l2" or "ip", the geometry the distances come from.

    Example:
        >>> nb = Neighbours(np.array([[1, 0]]), np.array([[0.5, 2.0]]))
        >>> nb.k, int(nb.indices[0, 0])
        (2, 1)
    """

    indices: np.ndarray
    distances: np.ndarray
    labels: np.ndarray | None = None
    metric: str = "l2"

    def __post_init__(self) -> None:
        self._check_and_freeze(copy=True)

    @classmethod
    def _adopt(
        cls, indices: np.ndarray, distances: np.ndarray, labels: np.ndarray | None, metric: str
    ) -> Neighbours:
        """Build from arrays that nobody else holds: checked and frozen, but not copied."""
        value = cls.__new__(cls)
        for name, field in (("indices", indices), ("distances", distances), ("labels", labels),
                            ("metric", metric)):  # fmt: skip
            object.__setattr__(value, name, field)
        value._check_and_freeze(copy=False)
        return value

    def _check_and_freeze(self, copy: bool) -> None:
        indices = np.array(self.indices, dtype=np.int64, copy=copy)
        distances = np.array(self.distances, dtype=np.float32, copy=copy)
        if indices.ndim != 2:
            raise ValueError(f"indices must be 2-D (num_queries, k), got shape {indices.shape}")
        if distances.shape != indices.shape:
            raise ValueError(
                f"distances has shape {distances.shape} but indices has shape {indices.shape}"
            )
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if np.isnan(distances).any():
            raise ValueError("distances contains NaN")
        missing = indices < 0
        if (indices < -1).any():
            raise ValueError("indices must be >= 0, or -1 for 'no neighbour found'")
        if not np.all(distances[missing] == np.inf):
            raise ValueError("entries with index -1 must have distance +inf")
        if indices.shape[1] > 1:
            if not np.all(distances[:, 1:] >= distances[:, :-1]):
                raise ValueError("each row of distances must be sorted, closest first")
            ordered = np.sort(indices, axis=1)
            if np.any((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)):
                raise ValueError("a reference appears twice in one row of indices")
        indices.setflags(write=False)
        distances.setflags(write=False)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "distances", distances)
        if self.labels is not None:
            labels = np.array(self.labels, copy=copy)
            if labels.ndim not in (2, 3) or labels.shape[:2] != indices.shape:
                raise ValueError(
                    f"labels has shape {labels.shape} but indices has shape {indices.shape}; "
                    "pass (num_queries, k) labels or (num_queries, k, num_labels) multi-hot rows"
                )
            labels.setflags(write=False)
            object.__setattr__(self, "labels", labels)

    @property
    def num_queries(self) -> int:
        """Number of queries (rows)."""
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        """Number of neighbours per query (columns)."""
        return int(self.indices.shape[1])

    @property
    def multi_label(self) -> bool:
        """True when ``labels`` holds multi-hot rows (num_queries, k, num_labels)."""
        return self.labels is not None and self.labels.ndim == 3

    def __len__(self) -> int:
        return self.num_queries

    def head(self, k: int) -> Neighbours:
        """Return a new value with only the first ``k`` neighbours of each query."""
        if not 0 <= k <= self.k:
            raise ValueError(f"k must be between 0 and {self.k}, got {k}")
        labels = None if self.labels is None else self.labels[:, :k]
        return Neighbours(self.indices[:, :k], self.distances[:, :k], labels, self.metric)

    def with_labels(self, reference_labels: np.ndarray) -> Neighbours:
        """Return a new value whose ``labels`` are ``reference_labels[indices]``.

        ``reference_labels`` is (num_reference,) class labels or (num_reference, num_labels)
        multi-hot rows.
        """
        reference_labels = np.asarray(reference_labels)
        labels = reference_labels[np.maximum(self.indices, 0)]
        return Neighbours(self.indices, self.distances, labels, self.metric)
