"""Who is relevant to whom: class labels, multi-hot label sets, or an explicit relevance matrix.

The retrieval metrics need, for each query i, the relevance rel(i, j) of the references it
retrieved and the number R_i of references relevant to it. Three layouts give them:

- class labels, one per row (integers of any width, booleans, strings): rel(i, j) = [y_i = y_j];
- multi-hot label sets, an (N, L) boolean or 0/1 matrix (dense, torch, or scipy sparse): rel(i,
  j) = [Y_i . Y_j > 0], the two rows share at least one label;
- an explicit (num_queries, num_reference) relevance matrix (dense or scipy sparse, booleans
  or 0/1): rel(i, j) = [G_ij != 0].

Memory stays bounded for large sets: neither layout forms a dense queries x references
matrix. R_i of multi-hot labels is the number of non-zeros of row i of Y_q Y_r^T, computed as
a sparse product over chunks of queries whose output is bounded by sum_l Y_il n_l (n_l the
references carrying label l); the relevance of retrieved neighbours is a sparse row-wise
intersection of the label sets, O(num_queries k) work.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import sparse

from deepmetric.metrics._inputs import as_labels, encode_labels
from deepmetric.neighbours import Neighbours

__all__ = [
    "ClassRelevance",
    "ExplicitRelevance",
    "SharedLabelRelevance",
    "as_label_rows",
    "as_relevance_matrix",
    "is_multi_hot",
]

# Bound on the stored entries of one sparse product (queries x references) while counting R.
_PRODUCT_ENTRIES = 1 << 24


def is_multi_hot(labels: Any) -> bool:
    """True when ``labels`` is a 2-D multi-hot matrix (dense, torch or scipy sparse)."""
    return sparse.issparse(labels) or np.ndim(labels) == 2


def _binary_csr(matrix: Any, name: str, what: str) -> sparse.csr_matrix:
    """``matrix`` as a canonical boolean CSR matrix; entries must be booleans or 0/1."""
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    if not sparse.issparse(matrix):
        matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D ({what}), got shape {matrix.shape}")
    if matrix.dtype.kind not in "biu":
        raise TypeError(
            f"{name} has dtype {matrix.dtype}; {what} must be booleans or 0/1 integers "
            "(use .astype(bool); for one class id per row pass a 1-D array)"
        )
    matrix = sparse.csr_matrix(matrix)
    if matrix.nnz and (matrix.data.min() < 0 or matrix.data.max() > 1):
        raise ValueError(
            f"{name} holds values other than 0 and 1; {what} are 0/1 (for one class id per "
            "row pass a 1-D array)"
        )
    matrix = sparse.csr_matrix(matrix.astype(bool))
    matrix.eliminate_zeros()
    matrix.sum_duplicates()
    matrix.sort_indices()
    return matrix


def as_label_rows(labels: Any, num_rows: int, name: str, rows_name: str) -> Any:
    """1-D class labels as a NumPy array, or (num_rows, L) multi-hot labels as boolean CSR.

    Example:
        >>> as_label_rows([[1, 0], [1, 1]], 2, "labels", "x").toarray().tolist()
        [[True, False], [True, True]]
    """
    if not is_multi_hot(labels):
        return as_labels(labels, num_rows, name, rows_name)
    rows = _binary_csr(labels, name, "multi-hot label rows (num_rows, num_labels)")
    if rows.shape[0] != num_rows:
        raise ValueError(f"{name} has {rows.shape[0]} rows but {rows_name} has {num_rows} rows")
    return rows


def as_relevance_matrix(matrix: Any, num_queries: int, num_reference: int) -> sparse.csr_matrix:
    """Check an explicit (num_queries, num_reference) relevance matrix; return boolean CSR.

    Example:
        >>> as_relevance_matrix(np.eye(2, dtype=bool), 2, 2).nnz
        2
    """
    matrix = _binary_csr(matrix, "relevance", "relevance entries (num_queries, num_reference)")
    if matrix.shape != (num_queries, num_reference):
        raise ValueError(
            f"relevance has shape {matrix.shape} but there are {num_queries} queries and "
            f"{num_reference} references; pass a (num_queries, num_reference) matrix"
        )
    return matrix


def _row_positions(rows: slice, k: int) -> np.ndarray:
    return np.repeat(np.arange(rows.start, rows.stop), k)


class ClassRelevance:
    """One class per row: reference j is relevant to query i when y_j = y_i."""

    kind = "class"

    def __init__(self, query_labels: np.ndarray, reference_labels: np.ndarray, exclude_self: bool):
        self.classes, (self.query_codes, self.reference_codes) = encode_labels(
            query_labels, reference_labels
        )
        self.exclude_self = exclude_self

    @property
    def groups(self) -> np.ndarray:
        """Class code of each query, for "macro" averages."""
        return self.query_codes

    def num_relevant(self) -> np.ndarray:
        """R_i = #{j : y_j = y_i} (minus the query itself when it is in the reference set)."""
        counts = np.bincount(self.reference_codes, minlength=len(self.classes))
        return counts[self.query_codes] - int(self.exclude_self)

    def of_neighbours(self, rows: slice, found: Neighbours) -> np.ndarray:
        """(n, k) rel of the neighbours of queries ``rows``; missing neighbours are irrelevant."""
        labels = found.labels
        if labels is None:
            labels = self.reference_codes[np.maximum(found.indices, 0)]
        return (labels == self.query_codes[rows, None]) & (found.indices >= 0)

    def block(self, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), num_reference) dense relevance, for one bounded block of queries."""
        codes = torch.from_numpy(self.reference_codes)
        return codes[None, :] == torch.from_numpy(self.query_codes[rows])[:, None]

    def describe(self, queries: np.ndarray) -> list[Any]:
        """The labels of a few queries, for messages."""
        return self.classes[self.query_codes[queries]].tolist()


class SharedLabelRelevance:
    """Multi-hot label sets: reference j is relevant to query i when they share a label."""

    kind = "multi-hot"

    def __init__(
        self, query_rows: sparse.csr_matrix, reference_rows: sparse.csr_matrix, exclude_self: bool
    ):
        if query_rows.shape[1] != reference_rows.shape[1]:
            raise ValueError(
                f"query labels have {query_rows.shape[1]} columns but reference labels have "
                f"{reference_rows.shape[1]}; use one label vocabulary for both"
            )
        self.query_rows, self.reference_rows = query_rows, reference_rows
        self.exclude_self = exclude_self
        self._by_label = reference_rows.T.tocsr()

    @property
    def groups(self) -> sparse.csr_matrix:
        """Label rows of the queries, for "macro" averages (a query counts in each label)."""
        return self.query_rows

    def num_relevant(self) -> np.ndarray:
        """R_i = #{j : Y_i . Y_j > 0} (minus the query itself when it is in the reference set).

        Sparse products over chunks of queries, each bounded by 2**24 stored entries (more only
        when one query alone is relevant to more references).
        """
        per_label = np.diff(self._by_label.indptr)
        bound = self.query_rows.astype(np.int64) @ per_label  # >= the stored entries of row i
        cumulative = np.concatenate([[0], np.cumsum(bound)])
        counts = np.empty(self.query_rows.shape[0], dtype=np.int64)
        start = 0
        while start < len(counts):
            stop = np.searchsorted(cumulative, cumulative[start] + _PRODUCT_ENTRIES, "right") - 1
            stop = min(max(int(stop), start + 1), len(counts))
            product = self.query_rows[start:stop] @ self._by_label
            counts[start:stop] = np.diff(product.indptr)
            start = stop
        if self.exclude_self:
            counts -= np.diff(self.query_rows.indptr) > 0
        return counts

    def of_neighbours(self, rows: slice, found: Neighbours) -> np.ndarray:
        """(n, k) rel of the neighbours of queries ``rows``: their label sets intersect."""
        n, k = found.indices.shape
        neighbour_rows = self.reference_rows[np.maximum(found.indices, 0).ravel()]
        query_rows = self.query_rows[_row_positions(rows, k)]
        shared = np.diff(neighbour_rows.multiply(query_rows).tocsr().indptr) > 0
        return shared.reshape(n, k) & (found.indices >= 0)

    def block(self, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), num_reference) dense relevance, for one bounded block of queries."""
        return torch.from_numpy((self.query_rows[rows] @ self._by_label).toarray())

    def describe(self, queries: np.ndarray) -> list[Any]:
        """Row positions of a few queries, for messages."""
        return [f"row {int(i)}" for i in queries]


class ExplicitRelevance:
    """An explicit relevance matrix G: reference j is relevant to query i when G_ij != 0."""

    kind = "relevance matrix"
    groups = None  # no classes: "macro" averages are undefined

    def __init__(self, matrix: sparse.csr_matrix, exclude_self: bool):
        self.matrix = matrix
        self.exclude_self = exclude_self

    def num_relevant(self) -> np.ndarray:
        """R_i = #{j : G_ij != 0}, the diagonal left out when the queries are the references."""
        counts = np.diff(self.matrix.indptr).astype(np.int64)
        if self.exclude_self:
            counts -= self.matrix.diagonal().astype(np.int64)
        return counts

    def of_neighbours(self, rows: slice, found: Neighbours) -> np.ndarray:
        """(n, k) rel of the neighbours of queries ``rows``: G at (query, neighbour)."""
        n, k = found.indices.shape
        columns = np.maximum(found.indices, 0).ravel()
        values = np.asarray(self.matrix[_row_positions(rows, k), columns]).reshape(n, k)
        return values.astype(bool) & (found.indices >= 0)

    def block(self, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), num_reference) dense relevance, for one bounded block of queries."""
        return torch.from_numpy(self.matrix[rows].toarray())

    def describe(self, queries: np.ndarray) -> list[Any]:
        """Row positions of a few queries, for messages."""
        return [f"row {int(i)}" for i in queries]
