"""Evaluation of embeddings: retrieval, k-NN classification, clustering, verification and the
classification-versus-ranking diagnostic, with one entry point, `evaluate`.

    >>> import numpy as np
    >>> from deepmetric.metrics import evaluate, format_table
    >>> x = np.array([[0.0], [0.1], [1.0], [1.2]])
    >>> print(format_table(evaluate(x, [0, 0, 1, 1], metrics=["recall@1", "map@r"])))
    metric       value
    -----------  ------
    num_queries  4
    num_skipped  0
    recall@1     1.0000
    map@r        1.0000
"""

from __future__ import annotations

from deepmetric.metrics.clustering import clustering_scores, kmeans, kmeans_plus_plus
from deepmetric.metrics.diagnostics import margin_diagnostics
from deepmetric.metrics.evaluation import DEFAULT_METRICS, DISTANCES, METRIC_NAMES, evaluate
from deepmetric.metrics.knn import knn_accuracy, knn_predict
from deepmetric.metrics.retrieval import (
    RetrievalScores,
    average_over_queries,
    count_relevant,
    map_at_r,
    mean_reciprocal_rank,
    precision_at_1,
    r_precision,
    recall_at_k,
    relevance,
    retrieval_scores,
)
from deepmetric.metrics.table import format_table
from deepmetric.metrics.verification import sample_pairs, verification_metrics

__all__ = [
    "DEFAULT_METRICS",
    "DISTANCES",
    "METRIC_NAMES",
    "RetrievalScores",
    "average_over_queries",
    "clustering_scores",
    "count_relevant",
    "evaluate",
    "format_table",
    "kmeans",
    "kmeans_plus_plus",
    "knn_accuracy",
    "knn_predict",
    "map_at_r",
    "margin_diagnostics",
    "mean_reciprocal_rank",
    "precision_at_1",
    "r_precision",
    "recall_at_k",
    "relevance",
    "retrieval_scores",
    "sample_pairs",
    "verification_metrics",
]
