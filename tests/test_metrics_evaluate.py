"""The evaluate() entry point: stable keys, bounded search depth, options, input errors,
the pretty table and the documentation examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deepmetric.index as index_module
from deepmetric.index import NeighbourIndex
from deepmetric.metrics import DEFAULT_METRICS, METRIC_NAMES, evaluate, format_table


def clustered(n=200, num_classes=8, dim=6, noise=0.6, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    centres = rng.standard_normal((num_classes, dim))
    return (centres[labels] + noise * rng.standard_normal((n, dim))).astype(np.float32), labels


def test_default_keys_are_stable():
    x, y = clustered()
    result = evaluate(x, y)
    assert list(result) == [
        "num_queries", "num_skipped", "recall@1", "recall@2", "recall@4", "recall@8",
        "precision@1", "r_precision", "map@r", "mrr", "knn_accuracy", "nmi", "ami",
    ]  # fmt: skip
    assert type(result) is dict
    assert all(isinstance(v, (int, float)) for v in result.values())
    assert set(DEFAULT_METRICS) <= set(METRIC_NAMES)
    table = format_table(result, title="demo")
    assert table.splitlines()[0] == "demo"
    assert all(key in table for key in result)


def test_single_recall_names_and_order():
    x, y = clustered()
    result = evaluate(x, y, metrics=["mrr", "recall@3", "recall@1"])
    assert list(result) == ["num_queries", "num_skipped", "recall@1", "recall@3", "mrr"]
    both = evaluate(x, y, metrics=["recall@k", "recall@16"], k=(1, 2))
    assert [key for key in both if key.startswith("recall")] == ["recall@1", "recall@2",
                                                                  "recall@16"]  # fmt: skip


def test_search_depth_is_the_largest_class_not_n_minus_one(monkeypatch):
    x, y = clustered(n=300, num_classes=10)
    asked = []
    original = NeighbourIndex.search

    def spy(self, queries, k, **kwargs):
        asked.append(k)
        return original(self, queries, k, **kwargs)

    monkeypatch.setattr(NeighbourIndex, "search", spy)
    evaluate(x, y, metrics=("recall@k", "map@r", "knn_accuracy"), k=(1, 2), knn_k=3)
    largest = int(np.bincount(y).max()) - 1
    assert set(asked) == {largest}
    assert largest < len(x) - 1


def test_chunking_does_not_change_results():
    x, y = clustered()
    metrics = ("recall@k", "precision@1", "r_precision", "map@r", "mrr", "knn_accuracy")
    assert evaluate(x, y, metrics=metrics, chunk_size=7) == evaluate(x, y, metrics=metrics)


def test_without_faiss_results_are_identical(monkeypatch):
    x, y = clustered()
    with_faiss = evaluate(x, y, metrics=("recall@k", "map@r", "mrr"), distance="cosine")
    monkeypatch.setattr(index_module, "_load_faiss", lambda: None)
    without = evaluate(x, y, metrics=("recall@k", "map@r", "mrr"), distance="cosine")
    assert without == pytest.approx(with_faiss, abs=1e-12)


def test_approximate_index_option_is_close_to_exact():
    x, y = clustered(n=1000, num_classes=10)
    exact = evaluate(x, y, metrics=("map@r", "recall@k"))
    approx = evaluate(x, y, metrics=("map@r", "recall@k"), index_kind="hnsw",
                      index_options={"ef_search": 128})  # fmt: skip
    assert approx["map@r"] == pytest.approx(exact["map@r"], abs=0.02)
    with pytest.raises(ValueError, match="kind"):
        evaluate(x, y, index_kind="annoy")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"query": np.zeros(4)}, ValueError, r"query must be 2-D"),
        ({"query_labels": [0, 1]}, ValueError, r"query_labels has 2 entries but query has 6"),
        ({"query": np.full((6, 2), np.nan)}, ValueError, r"NaN or inf in 6 of 6 rows"),
        ({"k": (1, 9)}, ValueError, r"Recall@9 .* only 5 candidate .* at most 5"),
        ({"k": (0,)}, ValueError, r"k must hold integers >= 1"),
        ({"metrics": ("map@k",)}, ValueError, r"unknown metric 'map@k'; valid names are recall@k"),
        ({"metrics": ()}, ValueError, r"metrics is empty"),
        ({"query_labels": np.arange(6) * 1.0}, TypeError, r"labels must be integers or strings"),
        ({"reference": np.zeros((3, 2))}, ValueError, r"without reference_labels"),
        ({"reference_labels": [0, 1]}, ValueError, r"without reference"),
        ({"distance": "manhattan"}, ValueError, r"distance must be one of"),
        ({"average": "weighted"}, ValueError, r"average must be one of"),
        ({"knn_k": 6, "metrics": ("knn_accuracy",)}, ValueError, r"knn_k=6 .* knn_k <= 5"),
        ({"query": np.zeros((6, 2)), "distance": "cosine"}, ValueError, r"all-zero rows"),
    ],
)
def test_input_errors_name_the_argument_and_the_fix(kwargs, error, match):
    arguments = {"query": np.arange(12.0).reshape(6, 2), "query_labels": [0, 0, 1, 1, 2, 2]}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        evaluate(**arguments)


def test_reference_errors():
    x = np.arange(12.0).reshape(6, 2)
    with pytest.raises(ValueError, match="embedding_dim 2 but reference has 3"):
        evaluate(x, [0] * 6, np.zeros((2, 3)), [0, 1])
    with pytest.raises(TypeError, match="mix strings and numbers"):
        evaluate(x, [0] * 6, np.zeros((2, 2)), ["0", "1"])
    with pytest.raises(ValueError, match="reference_labels has 1 entries"):
        evaluate(x, [0] * 6, np.zeros((2, 2)), [0])


def test_float16_torch_embeddings_are_accepted():
    x, y = clustered()
    half = evaluate(torch.from_numpy(x).half(), torch.from_numpy(y), metrics=("recall@1",))
    assert 0.0 <= half["recall@1"] <= 1.0
