"""One entry point that computes a chosen set of metrics from embeddings and labels."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from deepmetric.index import NeighbourIndex
from deepmetric.index_backends import block_distances
from deepmetric.metrics._inputs import (
    as_embeddings,
    as_labels,
    check_average,
    check_ks,
    encode_labels,
)
from deepmetric.metrics.clustering import kmeans
from deepmetric.metrics.diagnostics import _diagnostics
from deepmetric.metrics.knn import knn_predict
from deepmetric.metrics.retrieval import RetrievalScores, average_over_queries, retrieval_scores
from deepmetric.metrics.verification import sample_pairs, verification_metrics

__all__ = ["DEFAULT_METRICS", "DISTANCES", "METRIC_NAMES", "evaluate"]

RETRIEVAL_METRICS = ("recall@k", "precision@1", "r_precision", "map@r", "mrr")
METRIC_NAMES = RETRIEVAL_METRICS + ("knn_accuracy", "nmi", "ami", "diagnostics", "verification")
DEFAULT_METRICS = RETRIEVAL_METRICS + ("knn_accuracy", "nmi", "ami")
DISTANCES = ("euclidean", "cosine", "dot")

# Neighbour entries (queries x k) searched at once; about 20 bytes each while in flight.
_CHUNK_ENTRIES = 1 << 22
_BLOCK_ENTRIES = 1 << 24


def _parse_metrics(
    metrics: Sequence[str] | str, ks: tuple[int, ...]
) -> tuple[list[str], tuple[int, ...]]:
    """Validated metric names in canonical form, and the K values of Recall@K to report."""
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


def _first_relevant_ranks(
    rows: np.ndarray,
    query: np.ndarray,
    q_codes: np.ndarray,
    reference: np.ndarray,
    r_codes: np.ndarray,
    metric: str,
    exclude_self: bool,
) -> np.ndarray:
    """Exact 1-based rank of the first relevant reference, for the queries in ``rows``.

    rank = 1 + #{r : (d(q, r), r) < (d(q, p*), p*)}, p* the first relevant reference under
    the tie rule (smallest distance, then smallest index); the query itself is not counted.
    """
    ref = torch.from_numpy(reference)
    ref_sq = (ref * ref).sum(dim=1)
    codes = torch.from_numpy(r_codes)
    positions = torch.arange(len(reference))
    ranks = np.empty(len(rows), dtype=np.int64)
    step = max(1, _BLOCK_ENTRIES // len(reference))
    for start in range(0, len(rows), step):
        block_rows = rows[start : start + step]
        dist = block_distances(torch.from_numpy(query[block_rows]), ref, ref_sq, metric)
        if exclude_self:
            dist[torch.arange(len(block_rows)), torch.from_numpy(block_rows)] = float("inf")
        relevant = codes[None, :] == torch.from_numpy(q_codes[block_rows])[:, None]
        best = torch.where(relevant, dist, torch.full_like(dist, float("inf"))).min(dim=1).values
        at_best = dist == best[:, None]
        first = torch.where(relevant & at_best, positions, len(reference)).min(dim=1).values
        before = (dist < best[:, None]) | (at_best & (positions[None, :] < first[:, None]))
        ranks[start : start + step] = (1 + before.sum(dim=1)).numpy()
    return ranks


def evaluate(
    query: Any,
    query_labels: Any,
    reference: Any = None,
    reference_labels: Any = None,
    metrics: Sequence[str] | str = DEFAULT_METRICS,
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
) -> dict[str, float | int]:
    """Evaluate embeddings by retrieval, k-NN classification, clustering and diagnostics.

    Retrieval runs one k-NN search of the queries in the reference set, with k = the largest
    number R of relevant references of a query (also >= max(k) and knn_k): enough for
    Recall@K, Precision@1, R-Precision and MAP@R (Musgrave, Belongie, Lim 2020), never N - 1
    unless one class holds every item. Queries are searched in chunks, so memory stays
    bounded. When ``reference`` is None the queries are the reference set and each query is
    left out of its own list. Queries whose class has no other member (R = 0) are skipped,
    counted in "num_skipped" and reported by a warning. MRR is exact: a query whose first
    relevant reference is beyond the k retrieved gets its rank from an exact count.

    Keys, in this order, for the metrics chosen: "num_queries", "num_skipped",
    "recall@K" per K, "precision@1", "r_precision", "map@r", "mrr", "knn_accuracy", "nmi",
    "ami"; "diagnostics" adds "nearest_centre_accuracy", "centre_right_nn_wrong",
    "class_diameter", "suggested_margin" (and "suggested_cosine_margin" for cosine);
    "verification" adds "roc_auc", "eer", "tar@far=<f>", "best_threshold", "best_accuracy"
    from a seeded sample of ``num_pairs`` same-class and ``num_pairs`` other-class pairs.
    See docs/metrics.md for every definition; `format_table` prints the dict.

    Parameters:
        query: (num_queries, D) embeddings, NumPy array or torch tensor.
        query_labels: (num_queries,) labels, integers or strings (never cast to float).
        reference: (num_reference, D) embeddings, or None for the query set.
        reference_labels: (num_reference,) labels; required with ``reference``.
        metrics: names from METRIC_NAMES, or "recall@<K>" for a single K.
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

    Example:
        >>> x = np.array([[0.0], [0.1], [1.0], [1.2]])
        >>> r = evaluate(x, ["a", "a", "b", "b"], metrics=("recall@k", "map@r"), k=(1, 2))
        >>> r["recall@1"], r["map@r"], r["num_skipped"]
        (1.0, 1.0, 0)
    """
    ks = check_ks(k, "k")
    chosen, ks = _parse_metrics(metrics, ks)
    check_average(average)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    query = as_embeddings(query, "query")
    query_labels = as_labels(query_labels, len(query), "query_labels", "query")
    exclude_self = reference is None
    if exclude_self:
        if reference_labels is not None:
            raise ValueError("reference_labels was given without reference; pass both or neither")
        reference, reference_labels = query, query_labels
    else:
        if reference_labels is None:
            raise ValueError("reference was given without reference_labels; pass both")
        reference = as_embeddings(reference, "reference")
        reference_labels = as_labels(
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
    classes, (q_codes, r_codes) = encode_labels(query_labels, reference_labels)
    num_relevant = np.bincount(r_codes, minlength=len(classes))[q_codes] - int(exclude_self)
    valid = num_relevant > 0
    candidates = len(reference) - int(exclude_self)

    retrieval = [m for m in chosen if m in RETRIEVAL_METRICS]
    wants_knn = "knn_accuracy" in chosen
    wants_diagnostics = "diagnostics" in chosen
    if wants_diagnostics and distance == "dot":
        raise ValueError(
            "the 'diagnostics' metric needs a metric distance; use distance='euclidean' or 'cosine'"
        )
    depth = 0
    if "recall@k" not in chosen:
        ks = (1,)
    if retrieval:
        depth = max(ks[-1], int(num_relevant.max(initial=0)))
        if ks[-1] > candidates:
            raise ValueError(
                f"k={ks} asks for Recall@{ks[-1]} but each query has only {candidates} "
                f"candidate references{' (the query itself excluded)' * exclude_self}; "
                f"pass K values of at most {candidates}"
            )
    if wants_knn:
        if isinstance(knn_k, bool) or not isinstance(knn_k, (int, np.integer)) or knn_k < 1:
            raise ValueError(f"knn_k must be an integer >= 1, got {knn_k!r}")
        if knn_k > candidates:
            raise ValueError(
                f"knn_k={knn_k} but each query has only {candidates} candidate references; "
                f"pass knn_k <= {candidates}"
            )
        depth = max(depth, int(knn_k))
    if wants_diagnostics:
        depth = max(depth, 1)
    if depth > candidates or candidates < 1:
        raise ValueError(
            f"the reference set has {candidates} candidate references per query; it needs at "
            "least one more item"
        )

    out: dict[str, float | int] = {}
    if retrieval or wants_knn or wants_diagnostics:
        out["num_queries"] = len(query)
        out["num_skipped"] = int((~valid).sum())
        if out["num_skipped"]:
            skipped = classes[q_codes[~valid][:5]].tolist()
            warnings.warn(
                f"{out['num_skipped']} of {len(query)} queries have no other item of their "
                f"class in the reference set (labels such as {skipped}); they are skipped by "
                "the retrieval, k-NN and diagnostic metrics",
                stacklevel=2,
            )
    if depth:
        metric = "l2" if distance == "euclidean" else "ip"
        index = NeighbourIndex(reference.shape[1], metric, index_kind, **(index_options or {}))
        index.add(reference, labels=r_codes)
        rows = chunk_size or max(1, _CHUNK_ENTRIES // (depth + 2))
        parts: list[RetrievalScores] = []
        knn_correct = np.zeros(len(query), dtype=bool)
        nn_codes = np.zeros(len(query), dtype=np.int64)
        nn_found = np.zeros(len(query), dtype=bool)
        for start in range(0, len(query), rows):
            stop = min(start + rows, len(query))
            exclude = np.arange(start, stop) if exclude_self else None
            found = index.search(query[start:stop], depth, exclude=exclude)
            if retrieval:
                parts.append(
                    retrieval_scores(found, q_codes[start:stop], num_relevant[start:stop], ks)
                )
            if wants_knn:
                knn_correct[start:stop] = knn_predict(found, int(knn_k)) == q_codes[start:stop]
                knn_correct[start:stop] &= found.indices[:, 0] >= 0
            nn_codes[start:stop] = found.labels[:, 0]
            nn_found[start:stop] = found.indices[:, 0] >= 0
        if retrieval:
            scores = RetrievalScores.concatenate(parts)
            unresolved = np.flatnonzero(valid & (scores.first_relevant_rank == 0))
            if "mrr" in retrieval and len(unresolved):
                ranks = scores.first_relevant_rank.copy()
                ranks[unresolved] = _first_relevant_ranks(
                    unresolved, query, q_codes, reference, r_codes, metric, exclude_self
                )
                scores = scores.with_first_relevant_rank(ranks)
            summary = scores.summary(average, include_mrr="mrr" in retrieval)
            if "recall@k" in retrieval:
                out.update({f"recall@{K}": summary[f"recall@{K}"] for K in ks})
            out.update({m: summary[m] for m in RETRIEVAL_METRICS[1:] if m in retrieval})
        if wants_knn:
            out["knn_accuracy"] = average_over_queries(knn_correct, q_codes, valid, average)
    if "nmi" in chosen or "ami" in chosen:
        assignment = kmeans(query, len(np.unique(q_codes)), seed=seed)
        if "nmi" in chosen:
            out["nmi"] = float(normalized_mutual_info_score(q_codes, assignment))
        if "ami" in chosen:
            out["ami"] = float(adjusted_mutual_info_score(q_codes, assignment))
    if wants_diagnostics:
        out.update(
            _diagnostics(
                query, q_codes, reference, r_codes, nn_codes, nn_found, distance, exclude_self
            )
        )
    if "verification" in chosen:
        pair_q, pair_r, is_same = sample_pairs(
            q_codes, r_codes, num_pairs, seed=seed, exclude_self=exclude_self
        )
        a, b = query[pair_q].astype(np.float64), reference[pair_r].astype(np.float64)
        if distance == "euclidean":
            pair_scores = np.linalg.norm(a - b, axis=1)
        else:
            pair_scores = (a * b).sum(axis=1)
        out.update(
            verification_metrics(
                pair_scores, is_same, far=far, higher_is_same=distance != "euclidean"
            )
        )
    return out
