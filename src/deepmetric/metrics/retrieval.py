"""Retrieval metrics over k-NN results: Recall@K, Precision@1, R-Precision, MAP@R, MRR.

Every metric is computed per query from a `Neighbours` value and the number R of references
relevant to each query, then averaged over queries ("micro") or over classes ("macro"). A
reference is relevant when it has the query's class, or, with multi-hot label rows (N, L),
when it shares at least one label with the query (`deepmetric.metrics.labels`). A query with
R = 0 (no other reference shares its label) has no defined retrieval score: it is marked
invalid, skipped by the averages and reported by `deepmetric.metrics.evaluate`.

Neighbours are ranked by distance, ties by ascending reference index (`deepmetric.index`);
the metrics read the ranking as given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from deepmetric.metrics._inputs import (
    as_labels,
    check_average,
    check_ks,
    encode_labels,
    equal_labels,
)
from deepmetric.metrics.labels import SharedLabelRelevance, as_label_rows, is_multi_hot
from deepmetric.neighbours import Neighbours

__all__ = [
    "RetrievalScores",
    "average_over_queries",
    "count_relevant",
    "map_at_r",
    "mean_reciprocal_rank",
    "precision_at_1",
    "r_precision",
    "recall_at_k",
    "relevance",
    "retrieval_scores",
    "scores_from_relevance",
]


def _labels_array(
    labels: Any, name: str, num_rows: int | None = None, rows_name: str = ""
) -> np.ndarray:
    """Checked 1-D class labels (integers, booleans or strings; never floats)."""
    if num_rows is None:
        num_rows, rows_name = len(labels), name
    return as_labels(labels, num_rows, name, rows_name)


def _num_rows(labels: Any) -> int:
    return labels.shape[0] if sparse.issparse(labels) else len(labels)


def count_relevant(
    query_labels: Any, reference_labels: Any, *, exclude_self: bool = False
) -> np.ndarray:
    """Number R_i of references that share query i's label.

    R_i = #{j : reference_labels[j] == query_labels[i]} - [exclude_self], or with multi-hot
    label rows R_i = #{j : Y_i . Y_j > 0} - [exclude_self and Y_i != 0]. With
    ``exclude_self`` the queries are the reference set itself (query i is reference i) and
    each query does not count itself.

    Parameters:
        query_labels: (num_queries,) labels, integers or strings, or (num_queries, L)
            multi-hot rows (booleans or 0/1, dense or scipy sparse).
        reference_labels: (num_reference,) labels of the same kind, or (num_reference, L).
        exclude_self: query i is reference i and is left out of its own list.

    Example:
        >>> count_relevant(["a", "b"], ["a", "a", "c"]).tolist()
        [2, 0]
        >>> count_relevant([[1, 0], [0, 0]], [[1, 1], [0, 1], [1, 0]]).tolist()
        [2, 0]
    """
    multi = is_multi_hot(query_labels)
    if multi != is_multi_hot(reference_labels):
        raise ValueError(
            "query_labels and reference_labels must both be 1-D class labels or both "
            "(rows, num_labels) multi-hot matrices"
        )
    if multi:
        query_labels = as_label_rows(query_labels, _num_rows(query_labels), "query_labels", "it")
        reference_labels = as_label_rows(
            reference_labels, _num_rows(reference_labels), "reference_labels", "it"
        )
    else:
        query_labels = _labels_array(query_labels, "query_labels")
        reference_labels = _labels_array(reference_labels, "reference_labels")
    num_queries, num_reference = query_labels.shape[0], reference_labels.shape[0]
    if exclude_self and num_queries != num_reference:
        raise ValueError(
            f"exclude_self needs the queries to be the reference set, but query_labels has "
            f"{num_queries} entries and reference_labels {num_reference}"
        )
    if multi:
        return SharedLabelRelevance(query_labels, reference_labels, exclude_self).num_relevant()
    classes, (query_codes, reference_codes) = encode_labels(query_labels, reference_labels)
    counts = np.bincount(reference_codes, minlength=len(classes))
    return counts[query_codes] - int(exclude_self)


def relevance(neighbours: Neighbours, query_labels: Any) -> np.ndarray:
    """(num_queries, k) boolean matrix: neighbour j of query i shares the query's label.

    rel[i, j] = [labels[i, j] == query_labels[i]] and indices[i, j] >= 0 (labels compared by
    equality, never cast to float); with multi-hot rows (query_labels (num_queries, L) and
    neighbour labels (num_queries, k, L)) rel[i, j] = [labels[i, j] . query_labels[i] > 0].

    Example:
        >>> nb = Neighbours(np.array([[0, 1]]), np.array([[0.1, 0.2]]), np.array([["x", "y"]]))
        >>> relevance(nb, ["y"]).tolist()
        [[False, True]]
        >>> nb = nb.with_labels(np.array([[1, 0, 0], [0, 1, 1]]))
        >>> relevance(nb, [[0, 0, 1]]).tolist()
        [[False, True]]
    """
    if neighbours.labels is None:
        raise ValueError(
            "neighbours carries no labels; add labels to the index (index.add(x, labels=...)) "
            "or call neighbours.with_labels(reference_labels)"
        )
    multi = is_multi_hot(query_labels)
    if multi != neighbours.multi_label:
        raise ValueError(
            "query_labels and the neighbours' labels must both be class labels or both "
            "multi-hot rows (query_labels (num_queries, L), neighbour labels (num_queries, k, L))"
        )
    if multi:
        rows = as_label_rows(query_labels, neighbours.num_queries, "query_labels", "neighbours")
        if rows.shape[1] != neighbours.labels.shape[2]:
            raise ValueError(
                f"query_labels has {rows.shape[1]} labels per row but the neighbours have "
                f"{neighbours.labels.shape[2]}"
            )
        rows = rows.toarray()
        neighbour_rows = neighbours.labels.astype(bool)
        shared = np.einsum("qkl,ql->qk", neighbour_rows, rows, dtype=np.int64) > 0
        return shared & (neighbours.indices >= 0)
    query_labels = _labels_array(query_labels, "query_labels", neighbours.num_queries, "neighbours")
    return equal_labels(neighbours.labels, query_labels[:, None]) & (neighbours.indices >= 0)


def _check_num_relevant(num_relevant: Any, num_queries: int) -> np.ndarray:
    num_relevant = np.asarray(num_relevant)
    if num_relevant.shape != (num_queries,) or num_relevant.dtype.kind not in "iu":
        raise ValueError(
            f"num_relevant must be ({num_queries},) integers (see count_relevant), got shape "
            f"{num_relevant.shape} and dtype {num_relevant.dtype}"
        )
    if (num_relevant < 0).any():
        raise ValueError("num_relevant must be >= 0")
    return num_relevant.astype(np.int64)


def _check_depth(k: int, num_relevant: np.ndarray) -> None:
    largest = int(num_relevant.max(initial=0))
    if largest > k:
        raise ValueError(
            f"neighbours has k={k} per query but a query has R={largest} relevant references; "
            f"R-Precision and MAP@R read the first R neighbours, search with k >= {largest}"
        )


def _hits_within(rel: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    found = np.logical_or.accumulate(rel, axis=1)
    return found[:, [k - 1 for k in ks]]


def _r_precision(rel: np.ndarray, num_relevant: np.ndarray) -> np.ndarray:
    ranks = np.arange(1, rel.shape[1] + 1)
    within = ranks[None, :] <= num_relevant[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rel & within).sum(axis=1) / num_relevant


def _average_precision_at_r(rel: np.ndarray, num_relevant: np.ndarray) -> np.ndarray:
    ranks = np.arange(1, rel.shape[1] + 1)
    precision = np.cumsum(rel, axis=1) / ranks
    within = rel & (ranks[None, :] <= num_relevant[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(within, precision, 0.0).sum(axis=1) / num_relevant


def _first_relevant_rank(rel: np.ndarray) -> np.ndarray:
    if rel.shape[1] == 0:
        return np.zeros(len(rel), dtype=np.int64)
    return np.where(rel.any(axis=1), rel.argmax(axis=1) + 1, 0).astype(np.int64)


def average_over_queries(
    values: Any, query_labels: Any, valid: Any = None, average: str = "micro"
) -> float:
    """Average per-query values over valid queries ("micro") or over classes ("macro").

    micro = mean_{i valid} v_i;  macro = mean_c ( mean_{i valid, c in Y_i} v_i ) over the
    classes (labels) c with at least one valid query; with one class per row Y_i = {y_i}, with
    multi-hot rows a query counts once in each of its labels. NaN when no query is valid.

    Parameters:
        values: (num_queries,) numbers.
        query_labels: (num_queries,) labels or (num_queries, L) multi-hot rows (for "macro";
            None allows "micro" only, e.g. with an explicit relevance matrix).
        valid: optional (num_queries,) boolean mask of queries to count.
        average: "micro" or "macro".

    Example:
        >>> average_over_queries([1.0, 0.0, 0.0], ["a", "b", "b"], average="macro")
        0.5
        >>> average_over_queries([1.0, 0.0], [[1, 1], [0, 1]], average="macro")
        0.75
    """
    check_average(average)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, one number per query, got shape {values.shape}")
    valid = np.ones(len(values), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if valid.shape != values.shape:
        raise ValueError(f"valid has shape {valid.shape} but values has shape {values.shape}")
    if not np.isfinite(values[valid]).all():
        raise ValueError("values contains NaN or inf for a query counted by valid")
    if not valid.any():
        return float("nan")
    if average == "micro":
        return float(values[valid].mean())
    if query_labels is None:
        raise ValueError(
            "average='macro' needs class labels; with an explicit relevance matrix there are "
            "no classes, use average='micro'"
        )
    if is_multi_hot(query_labels):
        rows = as_label_rows(query_labels, len(values), "query_labels", "values")[valid]
        sums = rows.T.astype(np.float64) @ values[valid]
        counts = np.diff(rows.tocsc().indptr)
    else:
        labels = _labels_array(query_labels, "query_labels", len(values), "values")
        _, (codes,) = encode_labels(labels[valid])
        sums = np.bincount(codes, weights=values[valid])
        counts = np.bincount(codes)
    if not (counts > 0).any():
        return float("nan")
    return float((sums[counts > 0] / counts[counts > 0]).mean())


@dataclass(frozen=True, eq=False)
class RetrievalScores:
    """Per-query retrieval scores, read-only; `summary` averages them.

    Fields are NumPy arrays with one entry per query: ``hits_at_k[i, j]`` is 1 if a relevant
    reference is among the first ``ks[j]`` neighbours, ``r_precision`` and
    ``average_precision_at_r`` are the per-query R-Precision and AP@R, and
    ``first_relevant_rank`` the 1-based rank of the first relevant neighbour (0 when it lies
    beyond the retrieved list). ``valid`` marks queries with R >= 1. ``query_labels`` (for
    "macro" averages) is (num_queries,) labels, a (num_queries, L) sparse multi-hot matrix, or
    None when relevance came from an explicit matrix.

    Example:
        >>> nb = Neighbours(np.array([[1, 2]]), np.array([[0.1, 0.2]]), np.array([[7, 5]]))
        >>> retrieval_scores(nb, [5], num_relevant=[1], ks=(1, 2)).summary()["recall@2"]
        1.0
    """

    ks: tuple[int, ...]
    hits_at_k: np.ndarray
    r_precision: np.ndarray
    average_precision_at_r: np.ndarray
    first_relevant_rank: np.ndarray
    num_relevant: np.ndarray
    query_labels: np.ndarray | sparse.csr_matrix | None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray):
                value.setflags(write=False)

    @property
    def valid(self) -> np.ndarray:
        """Queries with at least one relevant reference (R >= 1)."""
        return self.num_relevant > 0

    @property
    def num_skipped(self) -> int:
        """Number of queries skipped because no reference shares their label."""
        return int((~self.valid).sum())

    def with_first_relevant_rank(self, ranks: Any) -> RetrievalScores:
        """Return a copy whose ``first_relevant_rank`` is ``ranks`` (e.g. resolved exactly)."""
        ranks = np.array(ranks, dtype=np.int64)
        return dataclasses.replace(self, first_relevant_rank=ranks)

    @classmethod
    def concatenate(cls, parts: Sequence[RetrievalScores]) -> RetrievalScores:
        """Join the scores of consecutive query chunks into one value."""
        if not parts:
            raise ValueError("parts is empty")
        arrays = {
            f.name: np.concatenate([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(cls)
            if f.name not in ("ks", "query_labels")
        }
        labels = [p.query_labels for p in parts]
        if any(part is None for part in labels):
            joined = None
        elif sparse.issparse(labels[0]):
            joined = sparse.vstack(labels, format="csr")
        else:
            joined = np.concatenate(labels)
        return cls(ks=parts[0].ks, query_labels=joined, **arrays)

    def summary(self, average: str = "micro", *, include_mrr: bool = True) -> dict[str, float]:
        """Averaged scores: "recall@K" per K, "precision@1", "r_precision", "map@r", "mrr"."""
        valid = self.valid

        def mean(values: np.ndarray) -> float:
            return average_over_queries(values, self.query_labels, valid, average)

        out = {f"recall@{k}": mean(self.hits_at_k[:, j]) for j, k in enumerate(self.ks)}
        if 1 in self.ks:
            out["precision@1"] = out["recall@1"]
        else:
            out["precision@1"] = mean(self.first_relevant_rank == 1)
        out["r_precision"] = mean(self.r_precision)
        out["map@r"] = mean(self.average_precision_at_r)
        if include_mrr:
            unresolved = int((valid & (self.first_relevant_rank == 0)).sum())
            if unresolved:
                raise ValueError(
                    f"{unresolved} queries have no relevant reference in their list, so their "
                    "reciprocal rank is unknown; use evaluate(), which resolves them exactly, "
                    "or summary(include_mrr=False)"
                )
            with np.errstate(divide="ignore"):
                out["mrr"] = mean(np.where(valid, 1.0 / self.first_relevant_rank, 0.0))
        return out


def retrieval_scores(
    neighbours: Neighbours,
    query_labels: Any,
    num_relevant: Any,
    ks: Sequence[int] | int = (1, 2, 4, 8),
) -> RetrievalScores:
    """Per-query Recall@K hits, R-Precision, AP@R and first-relevant rank from one k-NN list.

    With rel_i(j) = 1 if the j-th neighbour of query i shares its label and R_i the number of
    relevant references (Musgrave, Belongie, Lim 2020, "A Metric Learning Reality Check"):
        hit@K_i = max_{j <= K} rel_i(j)
        RP_i = (1 / R_i) sum_{j <= R_i} rel_i(j)
        AP@R_i = (1 / R_i) sum_{j <= R_i} P_i(j) rel_i(j),  P_i(j) = (1 / j) sum_{l <= j} rel_i(l)
    Needs k >= max(ks) and k >= max_i R_i.

    Parameters:
        neighbours: k-NN result with labels.
        query_labels: (num_queries,) labels.
        num_relevant: (num_queries,) R_i, e.g. from `count_relevant`.
        ks: the K of Recall@K.

    Example:
        >>> nb = Neighbours(np.array([[1, 2, 3]]), np.zeros((1, 3)), np.array([[0, 1, 1]]))
        >>> float(retrieval_scores(nb, [1], [2], ks=1).average_precision_at_r[0])
        0.25
    """
    ks = check_ks(ks, "ks")
    rel = relevance(neighbours, query_labels)
    num_relevant = _check_num_relevant(num_relevant, neighbours.num_queries)
    if ks[-1] > neighbours.k:
        raise ValueError(f"ks asks for Recall@{ks[-1]} but neighbours has only k={neighbours.k}")
    _check_depth(neighbours.k, num_relevant)
    if is_multi_hot(query_labels):
        groups = as_label_rows(query_labels, len(rel), "query_labels", "neighbours")
    else:
        groups = _labels_array(query_labels, "query_labels", len(rel), "neighbours").copy()
    return scores_from_relevance(rel, num_relevant, ks, groups)


def scores_from_relevance(
    rel: np.ndarray, num_relevant: np.ndarray, ks: tuple[int, ...], groups: Any
) -> RetrievalScores:
    """`RetrievalScores` from a checked (num_queries, k) relevance matrix of ranked lists.

    ``groups`` are the query labels used by "macro" averages (see `RetrievalScores`).

    Example:
        >>> s = scores_from_relevance(np.array([[False, True]]), np.array([1]), (1, 2), None)
        >>> s.hits_at_k.tolist(), s.first_relevant_rank.tolist()
        ([[False, True]], [2])
    """
    return RetrievalScores(
        ks=ks,
        hits_at_k=_hits_within(rel, ks),
        r_precision=_r_precision(rel, num_relevant),
        average_precision_at_r=_average_precision_at_r(rel, num_relevant),
        first_relevant_rank=_first_relevant_rank(rel),
        num_relevant=num_relevant,
        query_labels=groups,
    )


def _mean_over_queries(
    neighbours: Neighbours,
    query_labels: Any,
    num_relevant: Any,
    average: str,
    per_query: Any,
    *,
    needs_depth: bool = False,
) -> float:
    """Average ``per_query(rel, num_relevant)`` over the queries with R >= 1."""
    rel = relevance(neighbours, query_labels)
    num_relevant = _check_num_relevant(num_relevant, neighbours.num_queries)
    if needs_depth:
        _check_depth(neighbours.k, num_relevant)
    values = per_query(rel, num_relevant)
    return average_over_queries(values, query_labels, num_relevant > 0, average)


def recall_at_k(
    neighbours: Neighbours,
    query_labels: Any,
    num_relevant: Any,
    k: int = 1,
    average: str = "micro",
) -> float:
    """Recall@K: share of queries with at least one relevant reference among the first K.

    Recall@K = mean_i max_{j <= K} rel_i(j), the deep metric learning convention (Song, Xiang,
    Jegelka, Savarese 2016; Jegou, Douze, Schmid 2011), not the IR recall. Queries with
    R_i = 0 are skipped.

    Example:
        >>> nb = Neighbours(np.array([[1, 2]]), np.zeros((1, 2)), np.array([[3, 4]]))
        >>> recall_at_k(nb, [4], [1], k=1), recall_at_k(nb, [4], [1], k=2)
        (0.0, 1.0)
    """
    (k,) = check_ks(k)
    if k > neighbours.k:
        raise ValueError(f"k={k} but neighbours has only k={neighbours.k}; search deeper")
    return _mean_over_queries(
        neighbours,
        query_labels,
        num_relevant,
        average,
        lambda rel, _: _hits_within(rel, (k,))[:, 0],
    )


def precision_at_1(
    neighbours: Neighbours, query_labels: Any, num_relevant: Any, average: str = "micro"
) -> float:
    """Precision@1: share of queries whose nearest neighbour shares their label.

    P@1 = mean_i rel_i(1) over queries with R_i >= 1 (equal to Recall@1).

    Example:
        >>> nb = Neighbours(np.array([[1], [0]]), np.zeros((2, 1)), np.array([["a"], ["c"]]))
        >>> precision_at_1(nb, ["a", "b"], [1, 1])
        0.5
    """
    return recall_at_k(neighbours, query_labels, num_relevant, 1, average)


def r_precision(
    neighbours: Neighbours, query_labels: Any, num_relevant: Any, average: str = "micro"
) -> float:
    """R-Precision: share of relevant references among each query's first R neighbours.

    RP = mean_i (1 / R_i) sum_{j <= R_i} rel_i(j) (Musgrave, Belongie, Lim 2020); needs
    k >= max_i R_i.

    Example:
        >>> nb = Neighbours(np.array([[1, 2]]), np.zeros((1, 2)), np.array([[0, 1]]))
        >>> r_precision(nb, [1], [2])
        0.5
    """
    return _mean_over_queries(
        neighbours, query_labels, num_relevant, average, _r_precision, needs_depth=True
    )


def map_at_r(
    neighbours: Neighbours, query_labels: Any, num_relevant: Any, average: str = "micro"
) -> float:
    """MAP@R: mean average precision over each query's first R neighbours.

    MAP@R = mean_i (1 / R_i) sum_{j <= R_i} P_i(j) rel_i(j), P_i(j) = (1/j) sum_{l<=j} rel_i(l)
    (Musgrave, Belongie, Lim 2020). The sum is divided by R_i, not by the hits found, so a
    query with R = 4 retrieved as [hit, miss, miss, miss] scores 0.25, not 1.

    Example:
        >>> labels = np.array([[1, 0, 0, 0, 0]])
        >>> nb = Neighbours(np.arange(1, 6)[None], np.zeros((1, 5)), labels)
        >>> map_at_r(nb, [1], [4])
        0.25
    """
    return _mean_over_queries(
        neighbours, query_labels, num_relevant, average, _average_precision_at_r, needs_depth=True
    )


def mean_reciprocal_rank(
    neighbours: Neighbours, query_labels: Any, num_relevant: Any, average: str = "micro"
) -> float:
    """MRR: mean of 1 / (rank of the first relevant neighbour).

    MRR = mean_i 1 / min{j : rel_i(j) = 1} (Voorhees 1999, TREC-8 QA). A query whose first
    relevant reference lies beyond the k retrieved has an unknown rank: this raises, since a
    truncated value would be wrong; `evaluate` resolves such queries by an exact count.

    Example:
        >>> nb = Neighbours(np.array([[1, 2]]), np.zeros((1, 2)), np.array([[0, 1]]))
        >>> mean_reciprocal_rank(nb, [1], [1])
        0.5
    """

    def reciprocal_ranks(rel: np.ndarray, num_relevant: np.ndarray) -> np.ndarray:
        valid = num_relevant > 0
        ranks = _first_relevant_rank(rel)
        unresolved = int((valid & (ranks == 0)).sum())
        if unresolved:
            raise ValueError(
                f"{unresolved} queries have no relevant reference among their k={neighbours.k} "
                "neighbours, so their rank is unknown; search with a larger k or use evaluate()"
            )
        with np.errstate(divide="ignore"):
            return np.where(valid, 1.0 / ranks, 0.0)

    return _mean_over_queries(neighbours, query_labels, num_relevant, average, reciprocal_ranks)
