"""One entry point that computes a chosen set of metrics from embeddings and labels.

`evaluate` reads top to bottom: check the inputs and build the relevance judge (class
labels, multi-hot label rows or an explicit relevance matrix, `deepmetric.metrics.labels`),
choose the search depth, run one chunked k-NN search that scores every query, resolve the
exact MRR of the few queries whose first relevant reference lies beyond the list, then the
clustering, diagnostic and verification metrics, which need one class per row.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import sparse

from deepmetric.index import NeighbourIndex
from deepmetric.index_backends import BLOCK_ENTRIES, block_distances
from deepmetric.metrics._inputs import as_embeddings, check_average, check_count, check_ks
from deepmetric.metrics.clustering import kmeans_agreement
from deepmetric.metrics.diagnostics import _diagnostics
from deepmetric.metrics.knn import knn_predict
from deepmetric.metrics.labels import (
    ClassRelevance,
    ExplicitRelevance,
    SharedLabelRelevance,
    as_label_rows,
    as_relevance_matrix,
)
from deepmetric.metrics.retrieval import (
    RetrievalScores,
    average_over_queries,
    scores_from_relevance,
)
from deepmetric.metrics.verification import sample_pairs, verification_metrics

__all__ = ["CLASS_METRICS", "DEFAULT_METRICS", "DISTANCES", "METRIC_NAMES", "evaluate"]

RETRIEVAL_METRICS = ("recall@k", "precision@1", "r_precision", "map@r", "mrr")
# Metrics that need one class per row: refused with multi-hot labels or a relevance matrix.
CLASS_METRICS = ("knn_accuracy", "nmi", "ami", "diagnostics", "verification")
METRIC_NAMES = RETRIEVAL_METRICS + CLASS_METRICS
DEFAULT_METRICS = RETRIEVAL_METRICS + ("knn_accuracy", "nmi", "ami")
DISTANCES = ("euclidean", "cosine", "dot")

# Neighbour entries (queries x k) searched at once; about 20 bytes each while in flight.
_CHUNK_ENTRIES = 1 << 22

Judge = ClassRelevance | SharedLabelRelevance | ExplicitRelevance


def _parse_metrics(
    metrics: Sequence[str] | str | None, ks: tuple[int, ...]
) -> tuple[list[str] | None, tuple[int, ...]]:
    """Validated metric names in canonical form (None: the default for the labels), and the K
    values of Recall@K to report."""
    if metrics is None:
        return None, ks
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not names:
        raise ValueError(f"metrics is empty; choose from {', '.join(METRIC_NAMES)}")
    chosen: list[str] = []
    single_ks: set[int] = set()
    all_ks = False
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"metric names must be strings, got {name!r}")
        suffix = name[len("recall@") :]
        if name.startswith("recall@") and suffix.isdigit() and int(suffix) >= 1:
            single_ks.add(int(suffix))
            name = "recall@k"
        elif name == "recall@k":
            all_ks = True
        if name not in METRIC_NAMES:
            raise ValueError(
                f"unknown metric {name!r}; valid names are {', '.join(METRIC_NAMES)} "
                "(and recall@<K> for a single K)"
            )
        if name not in chosen:
            chosen.append(name)
    if single_ks:
        ks = tuple(sorted(single_ks | (set(ks) if all_ks else set())))
    return chosen, ks


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(
            f"{name} has {int((norms == 0).sum())} all-zero rows, which have no direction; "
            "cosine distance is undefined for them (use distance='euclidean')"
        )
    return (x / norms).astype(np.float32)


def _checked_inputs(
    query: Any,
    query_labels: Any,
    reference: Any,
    reference_labels: Any,
    relevance: Any,
    distance: str,
) -> tuple[np.ndarray, np.ndarray, bool, Judge]:
    """Checked (query, reference, exclude_self, relevance judge); reference may be query."""
    query = as_embeddings(query, "query")
    if relevance is not None:
        if query_labels is not None or reference_labels is not None:
            raise ValueError("pass labels or a relevance matrix, not both")
    elif query_labels is None:
        raise ValueError("query_labels is required (or pass relevance=...)")
    else:
        query_labels = as_label_rows(query_labels, len(query), "query_labels", "query")
    exclude_self = reference is None
    if exclude_self:
        if reference_labels is not None:
            raise ValueError("reference_labels was given without reference; pass both or neither")
        reference, reference_labels = query, query_labels
    else:
        if reference_labels is None and relevance is None:
            raise ValueError("reference was given without reference_labels; pass both")
        reference = as_embeddings(reference, "reference")
        if relevance is None:
            reference_labels = as_label_rows(
                reference_labels, len(reference), "reference_labels", "reference"
            )
        if reference.shape[1] != query.shape[1]:
            raise ValueError(
                f"query has embedding_dim {query.shape[1]} but reference has "
                f"{reference.shape[1]}; embed both with the same model"
            )
    if distance == "cosine":
        query = _unit_rows(query, "query")
        reference = query if exclude_self else _unit_rows(reference, "reference")
    if relevance is not None:
        matrix = as_relevance_matrix(relevance, len(query), len(reference))
        return query, reference, exclude_self, ExplicitRelevance(matrix, exclude_self)
    if sparse.issparse(query_labels) != sparse.issparse(reference_labels):
        raise ValueError(
            "query_labels and reference_labels must both be 1-D class labels or both "
            "(rows, num_labels) multi-hot matrices"
        )
    if sparse.issparse(query_labels):
        judge = SharedLabelRelevance(query_labels, reference_labels, exclude_self)
    else:
        judge = ClassRelevance(query_labels, reference_labels, exclude_self)
    return query, reference, exclude_self, judge


def _check_layout(chosen: list[str], judge: Judge, average: str, distance: str) -> None:
    """Refuse metrics that the label layout or the distance does not define."""
    if judge.kind != "class":
        refused = [name for name in chosen if name in CLASS_METRICS]
        if refused:
            raise ValueError(
                f"{', '.join(refused)} need one class per row, but the relevance comes from a "
                f"{judge.kind}; choose from {', '.join(RETRIEVAL_METRICS)} (see docs/metrics.md)"
            )
    if average == "macro" and judge.groups is None:
        raise ValueError(
            "average='macro' needs class labels; with an explicit relevance matrix there are "
            "no classes, use average='micro'"
        )
    if "diagnostics" in chosen and distance == "dot":
        raise ValueError(
            "the 'diagnostics' metric needs a metric distance; use distance='euclidean' or 'cosine'"
        )


def _search_depth(
    chosen: list[str], ks: tuple[int, ...], num_relevant: np.ndarray, candidates: int,
    knn_k: Any, exclude_self: bool,
) -> int:  # fmt: skip
    """k of the one k-NN search: max(largest R, max K, knn_k), 1 for the diagnostics alone."""
    depth = 0
    if any(m in RETRIEVAL_METRICS for m in chosen):
        depth = max(ks[-1], int(num_relevant.max(initial=0)))
        if ks[-1] > candidates:
            raise ValueError(
                f"k={ks} asks for Recall@{ks[-1]} but each query has only {candidates} "
                f"candidate references{' (the query itself excluded)' * exclude_self}; "
                f"pass K values of at most {candidates}"
            )
    if "knn_accuracy" in chosen:
        if isinstance(knn_k, bool) or not isinstance(knn_k, (int, np.integer)) or knn_k < 1:
            raise ValueError(f"knn_k must be an integer >= 1, got {knn_k!r}")
        if knn_k > candidates:
            raise ValueError(
                f"knn_k={knn_k} but each query has only {candidates} candidate references; "
                f"pass knn_k <= {candidates}"
            )
        depth = max(depth, int(knn_k))
    if "diagnostics" in chosen:
        depth = max(depth, 1)
    if depth > candidates or candidates < 1:
        raise ValueError(
            f"the reference set has {candidates} candidate references per query; it needs at "
            "least one more item"
        )
    return depth


def _report_skipped(judge: Judge, valid: np.ndarray, stacklevel: int) -> int:
    """Number of queries without a relevant reference; warn with a few of their labels."""
    skipped = int((~valid).sum())
    if skipped:
        examples = judge.describe(np.flatnonzero(~valid)[:5])
        warnings.warn(
            f"{skipped} of {len(valid)} queries have no relevant reference (no other item "
            f"shares their label) in the reference set (labels such as {examples}); they are "
            "skipped by the retrieval, k-NN and diagnostic metrics",
            stacklevel=stacklevel,
        )
    return skipped


@dataclass
class _SearchPass:
    """What one chunked search over all queries leaves behind (per-query, no neighbours)."""

    scores: RetrievalScores | None
    knn_correct: np.ndarray
    nn_codes: np.ndarray
    nn_found: np.ndarray


def _search_pass(
    query: np.ndarray,
    reference: np.ndarray,
    judge: Judge,
    num_relevant: np.ndarray,
    chosen: list[str],
    ks: tuple[int, ...],
    depth: int,
    *,
    exclude_self: bool,
    knn_k: int,
    index: NeighbourIndex,
    chunk_size: int | None,
) -> _SearchPass:
    """Search the queries chunk by chunk; keep per-query scores, drop the neighbours."""
    is_class = judge.kind == "class"
    index.add(reference, labels=judge.reference_codes if is_class else None)
    retrieval = any(m in RETRIEVAL_METRICS for m in chosen)
    wants_knn = "knn_accuracy" in chosen
    rows = chunk_size or max(1, _CHUNK_ENTRIES // (depth + 2))
    parts: list[RetrievalScores] = []
    knn_correct = np.zeros(len(query), dtype=bool)
    nn_codes = np.zeros(len(query), dtype=np.int64)
    nn_found = np.zeros(len(query), dtype=bool)
    for start in range(0, len(query), rows):
        chunk = slice(start, min(start + rows, len(query)))
        exclude = np.arange(chunk.start, chunk.stop) if exclude_self else None
        found = index.search(query[chunk], depth, exclude=exclude)
        if retrieval:
            rel = judge.of_neighbours(chunk, found)
            parts.append(scores_from_relevance(rel, num_relevant[chunk], ks, None))
        nn_found[chunk] = found.indices[:, 0] >= 0
        if is_class:
            if wants_knn:
                predicted = knn_predict(found, int(knn_k))
                knn_correct[chunk] = (predicted == judge.query_codes[chunk]) & nn_found[chunk]
            nn_codes[chunk] = found.labels[:, 0]
    scores = None
    if retrieval:
        scores = dataclasses.replace(RetrievalScores.concatenate(parts), query_labels=judge.groups)
    return _SearchPass(scores, knn_correct, nn_codes, nn_found)


def _first_relevant_ranks(
    rows: np.ndarray,
    query: np.ndarray,
    reference: np.ndarray,
    judge: Judge,
    metric: str,
    exclude_self: bool,
) -> np.ndarray:
    """Exact 1-based rank of the first relevant reference, for the queries in ``rows``.

    rank = 1 + #{r : (d(q, r), r) < (d(q, p*), p*)}, p* the first relevant reference under
    the tie rule (smallest distance, then smallest index); the query itself is not counted.
    """
    ref = torch.from_numpy(reference)
    ref_sq = (ref * ref).sum(dim=1)
    positions = torch.arange(len(reference))
    ranks = np.empty(len(rows), dtype=np.int64)
    step = max(1, BLOCK_ENTRIES // len(reference))
    for start in range(0, len(rows), step):
        block_rows = rows[start : start + step]
        dist = block_distances(torch.from_numpy(query[block_rows]), ref, ref_sq, metric)
        if exclude_self:
            dist[torch.arange(len(block_rows)), torch.from_numpy(block_rows)] = float("inf")
        relevant = judge.block(block_rows)
        best = torch.where(relevant, dist, torch.full_like(dist, float("inf"))).min(dim=1).values
        at_best = dist == best[:, None]
        first = torch.where(relevant & at_best, positions, len(reference)).min(dim=1).values
        before = (dist < best[:, None]) | (at_best & (positions[None, :] < first[:, None]))
        ranks[start : start + step] = (1 + before.sum(dim=1)).numpy()
    return ranks


def _retrieval_results(
    scores: RetrievalScores,
    chosen: list[str],
    ks: tuple[int, ...],
    average: str,
    resolve_ranks: Any,
) -> dict[str, float]:
    """The chosen retrieval keys; MRR made exact for queries whose first hit is beyond k."""
    unresolved = np.flatnonzero(scores.valid & (scores.first_relevant_rank == 0))
    if "mrr" in chosen and len(unresolved):
        ranks = scores.first_relevant_rank.copy()
        ranks[unresolved] = resolve_ranks(unresolved)
        scores = scores.with_first_relevant_rank(ranks)
    summary = scores.summary(average, include_mrr="mrr" in chosen)
    out = {}
    if "recall@k" in chosen:
        out.update({f"recall@{K}": summary[f"recall@{K}"] for K in ks})
    out.update({m: summary[m] for m in RETRIEVAL_METRICS[1:] if m in chosen})
    return out


def _verification(
    query: np.ndarray,
    reference: np.ndarray,
    judge: ClassRelevance,
    *,
    distance: str,
    far: Sequence[float],
    num_pairs: int,
    seed: int,
    exclude_self: bool,
) -> dict[str, float]:
    """Verification metrics from a seeded sample of same-class and other-class pairs."""
    pair_q, pair_r, is_same = sample_pairs(
        judge.query_codes, judge.reference_codes, num_pairs, seed=seed, exclude_self=exclude_self
    )
    a, b = query[pair_q].astype(np.float64), reference[pair_r].astype(np.float64)
    if distance == "euclidean":
        pair_scores = np.linalg.norm(a - b, axis=1)
    else:
        pair_scores = (a * b).sum(axis=1)
    higher_is_same = distance != "euclidean"
    return verification_metrics(pair_scores, is_same, far=far, higher_is_same=higher_is_same)


def evaluate(
    query: Any,
    query_labels: Any = None,
    reference: Any = None,
    reference_labels: Any = None,
    metrics: Sequence[str] | str | None = None,
    k: Sequence[int] | int = (1, 2, 4, 8),
    *,
    distance: str = "euclidean",
    average: str = "micro",
    knn_k: int = 5,
    far: Sequence[float] = (1e-3, 1e-2),
    num_pairs: int = 100_000,
    seed: int = 0,
    index_kind: str = "flat",
    index_options: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    relevance: Any = None,
) -> dict[str, float | int]:
    """Evaluate embeddings by retrieval, k-NN classification, clustering and diagnostics.

    Retrieval runs one k-NN search of the queries in the reference set, with k = the largest
    number R of relevant references of a query (also >= max(k) and knn_k): enough for
    Recall@K, Precision@1, R-Precision and MAP@R (Musgrave, Belongie, Lim 2020), never N - 1
    unless one class holds every item. Queries are searched in chunks, so memory stays
    bounded. When ``reference`` is None the queries are the reference set and each query is
    left out of its own list. Queries with no relevant reference (R = 0) are skipped,
    counted in "num_skipped" and reported by a warning. MRR is exact: a query whose first
    relevant reference is beyond the k retrieved gets its rank from an exact count.

    A reference is relevant to a query when it has the query's class (1-D labels), when the
    two share at least one label (multi-hot label rows (N, L)), or as an explicit
    ``relevance`` matrix says. knn_accuracy, nmi, ami, diagnostics and verification need one
    class per row and are refused otherwise; "macro" averages of multi-hot labels count a
    query once in each of its labels.

    Keys, in this order, for the metrics chosen: "num_queries", "num_skipped",
    "recall@K" per K, "precision@1", "r_precision", "map@r", "mrr", "knn_accuracy", "nmi",
    "ami"; "diagnostics" adds "nearest_centre_accuracy", "centre_right_nn_wrong",
    "class_diameter", "suggested_margin" (and "suggested_cosine_margin" for cosine);
    "verification" adds "roc_auc", "eer", "tar@far=<f>", "best_threshold", "best_accuracy"
    from a seeded sample of ``num_pairs`` same-class and ``num_pairs`` other-class pairs.
    See docs/metrics.md for every definition; `format_table` prints the dict.

    Parameters:
        query: (num_queries, D) embeddings, NumPy array or torch tensor.
        query_labels: (num_queries,) labels, integers or strings (never cast to float), or
            (num_queries, L) multi-hot rows (booleans or 0/1; dense, torch or scipy sparse).
        reference: (num_reference, D) embeddings, or None for the query set.
        reference_labels: labels of the same layout; required with ``reference`` (unless
            ``relevance`` is given).
        metrics: names from METRIC_NAMES, or "recall@<K>" for a single K; None means
            DEFAULT_METRICS for class labels and the retrieval metrics otherwise.
        k: the K values of Recall@K.
        distance: "euclidean", "cosine" (unit-normalised inner product) or "dot".
        average: "micro" (over queries) or "macro" (per class, then over classes) for the
            retrieval metrics and knn_accuracy.
        knn_k: neighbours that vote in knn_accuracy.
        far: false accept rates for "tar@far=<f>".
        num_pairs: pairs of each kind sampled for "verification".
        seed: seed of k-means and of the pair sample.
        index_kind: "flat" (exact), "ivf" or "hnsw" (approximate, faiss).
        index_options: extra keyword arguments of `NeighbourIndex` (nlist, nprobe, ...).
        chunk_size: queries per search call; default keeps about 4M neighbours in flight.
        relevance: instead of labels, a (num_queries, num_reference) matrix of booleans or
            0/1 (dense or scipy sparse) whose non-zero entries mark relevant pairs; with
            ``reference=None`` its diagonal is ignored.

    Example:
        >>> x = np.array([[0.0], [0.1], [1.0], [1.2]])
        >>> r = evaluate(x, ["a", "a", "b", "b"], metrics=("recall@k", "map@r"), k=(1, 2))
        >>> r["recall@1"], r["map@r"], r["num_skipped"]
        (1.0, 1.0, 0)
        >>> evaluate(x, [[1, 0], [1, 1], [0, 1], [0, 1]], metrics="map@r")["map@r"]
        1.0
    """
    ks = check_ks(k, "k")
    chosen, ks = _parse_metrics(metrics, ks)
    check_average(average)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    check_count(num_pairs, "num_pairs")
    check_count(seed, "seed", minimum=0)
    if chunk_size is not None:
        check_count(chunk_size, "chunk_size")
    query, reference, exclude_self, judge = _checked_inputs(
        query, query_labels, reference, reference_labels, relevance, distance
    )
    if chosen is None:
        chosen = list(DEFAULT_METRICS if judge.kind == "class" else RETRIEVAL_METRICS)
    _check_layout(chosen, judge, average, distance)
    if "recall@k" not in chosen:
        ks = (1,)
    num_relevant = judge.num_relevant()
    valid = num_relevant > 0
    candidates = len(reference) - int(exclude_self)
    depth = _search_depth(chosen, ks, num_relevant, candidates, knn_k, exclude_self)
    metric = "l2" if distance == "euclidean" else "ip"

    out: dict[str, float | int] = {}
    if depth:
        out["num_queries"] = len(query)
        out["num_skipped"] = _report_skipped(judge, valid, stacklevel=3)
        index = NeighbourIndex(reference.shape[1], metric, index_kind, **(index_options or {}))
        found = _search_pass(
            query, reference, judge, num_relevant, chosen, ks, depth,
            exclude_self=exclude_self, knn_k=knn_k, index=index, chunk_size=chunk_size,
        )  # fmt: skip
        if found.scores is not None:

            def resolve(rows: np.ndarray) -> np.ndarray:
                return _first_relevant_ranks(rows, query, reference, judge, metric, exclude_self)

            out.update(_retrieval_results(found.scores, chosen, ks, average, resolve))
        if "knn_accuracy" in chosen:
            out["knn_accuracy"] = average_over_queries(
                found.knn_correct, judge.query_codes, valid, average
            )
    clustering = tuple(name for name in ("nmi", "ami") if name in chosen)
    if clustering:
        out.update(kmeans_agreement(query, judge.query_codes, clustering, seed=seed))
    if "diagnostics" in chosen:
        out.update(
            _diagnostics(
                query,
                judge.query_codes,
                reference,
                judge.reference_codes,
                found.nn_codes,
                found.nn_found,
                distance,
                exclude_self,
            )
        )
    if "verification" in chosen:
        out.update(
            _verification(
                query,
                reference,
                judge,
                distance=distance,
                far=far,
                num_pairs=num_pairs,
                seed=seed,
                exclude_self=exclude_self,
            )
        )
    return out
