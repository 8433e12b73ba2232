"""Multi-hot labels and explicit relevance matrices in the retrieval metrics, against slow
references written from the definitions (loops over queries, references and labels)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse

import deepmetric.metrics.labels as labels_module
from deepmetric.metrics import (
    average_over_queries,
    count_relevant,
    evaluate,
    map_at_r,
    mean_reciprocal_rank,
    precision_at_1,
    r_precision,
    recall_at_k,
    relevance,
    retrieval_scores,
)
from deepmetric.neighbours import Neighbours

RETRIEVAL = ("recall@k", "precision@1", "r_precision", "map@r", "mrr")

# ---------------------------------------------------------------- slow references


def shares_a_label(a, b):
    """1 when the label sets (rows of 0/1) have a label in common, by a loop over labels."""
    return any(a[label] and b[label] for label in range(len(a)))


def slow_relevance_rankings(query, reference, is_relevant, exclude_self, distance):
    """For each query, rel of every candidate ranked by exact distance, ties by index."""
    query = np.asarray(query, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    rankings = []
    for i, q in enumerate(query):
        keyed = []
        for j, r in enumerate(reference):
            if exclude_self and i == j:
                continue
            d = float(((q - r) ** 2).sum()) if distance == "euclidean" else -float(q @ r)
            keyed.append((d, j))
        keyed.sort()
        rankings.append([bool(is_relevant(i, j)) for _, j in keyed])
    return rankings


def slow_scores(rankings, ks, groups=None, average="micro"):
    """Every retrieval metric from its definition; macro: per label, then over labels."""
    per_query = {f"recall@{k}": [] for k in ks}
    for name in ("precision@1", "r_precision", "map@r", "mrr"):
        per_query[name] = []
    kept = []
    for i, rel in enumerate(rankings):
        r = sum(rel)
        if r == 0:
            continue
        kept.append(i)
        for k in ks:
            per_query[f"recall@{k}"].append(float(any(rel[:k])))
        per_query["precision@1"].append(float(rel[0]))
        per_query["r_precision"].append(sum(rel[:r]) / r)
        ap = sum(sum(rel[: j + 1]) / (j + 1) for j in range(r) if rel[j])
        per_query["map@r"].append(ap / r)
        per_query["mrr"].append(1.0 / (rel.index(True) + 1))
    out = {}
    for name, values in per_query.items():
        if not values:
            out[name] = float("nan")
        elif average == "micro":
            out[name] = float(np.mean(values))
        else:
            by_label = {}
            for i, value in zip(kept, values, strict=True):
                for label in range(groups.shape[1]):
                    if groups[i, label]:
                        by_label.setdefault(label, []).append(value)
            out[name] = float(np.mean([np.mean(v) for v in by_label.values()]))
    return out, len(rankings) - len(kept)


def assert_matches(result, expected):
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-12, nan_ok=True), name


def as_layout(rows, layout):
    if layout == "bool":
        return rows.astype(bool)
    if layout == "int":
        return rows.astype(np.int64)
    if layout == "uint8-torch":
        return torch.from_numpy(rows.astype(np.uint8))
    return sparse.csr_matrix(rows.astype(np.int8))


# ---------------------------------------------------------------- evaluate vs the references


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_multi_hot_evaluate_matches_slow_reference(data):
    # Integer coordinates: exact float32 distances, duplicates and many ties. Rows may have no
    # label at all (skipped queries) or every label.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    n = data.draw(st.integers(4, 30))
    dim = data.draw(st.integers(1, 3))
    num_labels = data.draw(st.integers(1, 5))
    density = data.draw(st.sampled_from([0.1, 0.3, 0.6]))
    x = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    rows = (rng.random((n, num_labels)) < density).astype(np.int64)
    separate = data.draw(st.booleans())
    distance = data.draw(st.sampled_from(["euclidean", "dot"]))
    average = data.draw(st.sampled_from(["micro", "macro"]))
    layout = data.draw(st.sampled_from(["bool", "int", "uint8-torch", "sparse"]))
    if separate:
        m = data.draw(st.integers(1, 12))
        query = rng.integers(-2, 3, size=(m, dim)).astype(np.float32)
        query_rows = (rng.random((m, num_labels)) < density).astype(np.int64)
        args = (query, as_layout(query_rows, layout), x, as_layout(rows, layout))
    else:
        query, query_rows = x, rows
        args = (x, as_layout(rows, layout))
    candidates = n - (not separate)
    ks = tuple(sorted(set(data.draw(st.lists(st.integers(1, candidates), min_size=1)))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate(
            *args, metrics=RETRIEVAL, k=ks, distance=distance, average=average,
            chunk_size=data.draw(st.sampled_from([None, 1, 5])),
        )  # fmt: skip
    rankings = slow_relevance_rankings(
        query, x, lambda i, j: shares_a_label(query_rows[i], rows[j]), not separate, distance
    )
    expected, skipped = slow_scores(rankings, ks, query_rows, average)
    assert_matches(result, expected)
    assert result["num_skipped"] == skipped


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_explicit_relevance_matches_slow_reference(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    n = data.draw(st.integers(3, 25))
    x = rng.integers(-2, 3, size=(n, 2)).astype(np.float32)
    separate = data.draw(st.booleans())
    query = rng.integers(-2, 3, size=(data.draw(st.integers(1, 10)), 2)).astype(np.float32)
    query = query if separate else x
    matrix = rng.random((len(query), n)) < data.draw(st.sampled_from([0.1, 0.4]))
    given_matrix = data.draw(st.sampled_from([matrix, matrix.astype(np.uint8), None]))
    given_matrix = sparse.csr_matrix(matrix) if given_matrix is None else given_matrix
    candidates = n - (not separate)
    ks = (1, min(3, candidates))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate(
            query, reference=x if separate else None, relevance=given_matrix, k=ks,
            chunk_size=data.draw(st.sampled_from([None, 2])),
        )  # fmt: skip
    assert list(result)[2:] == ["recall@1", f"recall@{ks[1]}"][: len(set(ks))] + [
        "precision@1", "r_precision", "map@r", "mrr",
    ]  # fmt: skip
    # With the queries as the reference set, the diagonal is ignored: the query is no candidate.
    rankings = slow_relevance_rankings(
        query, x, lambda i, j: matrix[i, j], not separate, "euclidean"
    )
    expected, skipped = slow_scores(rankings, tuple(sorted(set(ks))))
    assert_matches(result, expected)
    assert result["num_skipped"] == skipped


def test_one_hot_rows_give_the_class_label_results():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=120)
    x = rng.standard_normal((7, 5))[labels] + 0.9 * rng.standard_normal((120, 5))
    one_hot = np.eye(7, dtype=bool)[labels]
    for average in ("micro", "macro"):
        by_class = evaluate(x, labels, metrics=RETRIEVAL, average=average)
        by_rows = evaluate(x, one_hot, metrics=RETRIEVAL, average=average)
        assert by_rows == pytest.approx(by_class, abs=1e-12)


def test_multi_hot_default_metrics_are_the_retrieval_metrics():
    x = np.array([[0.0], [0.1], [1.0], [1.2]])
    result = evaluate(x, [[1, 0], [1, 1], [0, 1], [0, 1]], k=(1, 2))
    assert list(result) == [
        "num_queries", "num_skipped", "recall@1", "recall@2", "precision@1", "r_precision",
        "map@r", "mrr",
    ]  # fmt: skip


def test_count_relevant_multi_hot_matches_a_loop_and_chunking(monkeypatch):
    rng = np.random.default_rng(1)
    query_rows = rng.random((40, 6)) < 0.3
    reference_rows = rng.random((55, 6)) < 0.3
    expected = [
        sum(shares_a_label(q, r) for r in reference_rows) for q in query_rows
    ]  # fmt: skip
    assert count_relevant(query_rows, reference_rows).tolist() == expected
    self_expected = [
        sum(shares_a_label(q, r) for j, r in enumerate(query_rows) if j != i)
        for i, q in enumerate(query_rows)
    ]
    assert count_relevant(query_rows, query_rows, exclude_self=True).tolist() == self_expected
    monkeypatch.setattr(labels_module, "_PRODUCT_ENTRIES", 3)
    assert count_relevant(query_rows, reference_rows).tolist() == expected


def test_neighbour_functions_take_multi_hot_label_rows():
    # Query 0 has labels {0}; its neighbours have {0, 1}, {2}, {0}; R = 2.
    # Query 1 has labels {1, 2}; its neighbours have {0}, {0}, {2}; R = 1.
    reference = np.array([[1, 1, 0], [0, 0, 1], [1, 0, 0], [1, 0, 0]])
    found = Neighbours(np.array([[0, 1, 2], [2, 3, 1]]), np.zeros((2, 3))).with_labels(reference)
    query = np.array([[1, 0, 0], [0, 1, 1]])
    rel = relevance(found, query)
    assert rel.tolist() == [[True, False, True], [False, False, True]]
    num_relevant = [2, 1]
    assert recall_at_k(found, query, num_relevant, k=1) == 0.5
    assert precision_at_1(found, query, num_relevant) == 0.5
    assert r_precision(found, query, num_relevant) == pytest.approx((1 / 2 + 0) / 2)
    assert map_at_r(found, query, num_relevant) == pytest.approx((1 / 2 + 0) / 2)
    assert mean_reciprocal_rank(found, query, num_relevant) == pytest.approx((1 + 1 / 3) / 2)
    scores = retrieval_scores(found, sparse.csr_matrix(query), num_relevant, ks=(1, 3))
    # macro: label 0 -> query 0 (1.0); label 1 and 2 -> query 1 (1/3): mean(1, 1/3, 1/3).
    assert scores.summary("macro")["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert average_over_queries([1.0, 0.0], query, average="macro") == pytest.approx(1 / 3)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", ["knn_accuracy", "nmi", "ami", "diagnostics", "verification"])
def test_class_only_metrics_are_refused_for_multi_hot_labels(name):
    x = np.arange(8.0)[:, None]
    rows = np.eye(2, dtype=bool)[np.arange(8) % 2]
    with pytest.raises(ValueError, match=f"{name} need one class per row"):
        evaluate(x, rows, metrics=[name])
    with pytest.raises(ValueError, match="need one class per row"):
        evaluate(x, relevance=np.ones((8, 8), bool), metrics=["map@r", name])


def test_layout_errors_name_the_argument_and_the_fix():
    x = np.arange(6.0)[:, None]
    rows = np.eye(3, dtype=bool)[np.arange(6) % 3]
    with pytest.raises(ValueError, match="both be 1-D class labels or both"):
        evaluate(x, rows, x, np.arange(6))
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        evaluate(x, rows.astype(int) * 2)
    with pytest.raises(TypeError, match=r"float64.*astype\(bool\)"):
        evaluate(x, rows.astype(float))
    with pytest.raises(ValueError, match="query_labels has 5 rows but query has 6"):
        evaluate(x, rows[:5])
    with pytest.raises(ValueError, match="2 columns but reference labels have 3"):
        evaluate(x, rows[:, :2], x, rows)
    with pytest.raises(ValueError, match=r"relevance has shape \(6, 5\)"):
        evaluate(x, relevance=np.ones((6, 5), bool))
    with pytest.raises(ValueError, match="not both"):
        evaluate(x, rows, relevance=np.ones((6, 6), bool))
    with pytest.raises(ValueError, match="macro.*micro"):
        evaluate(x, relevance=np.ones((6, 6), bool), average="macro")
    with pytest.raises(ValueError, match="query_labels is required"):
        evaluate(x)


def test_duplicates_ties_singleton_and_unlabelled_rows():
    # Three duplicates at 0 (every distance ties), two at 1; label "c" is carried by one item
    # only and item 4 has no label: both are skipped. Labels: a, b, c.
    x = np.array([[0.0], [0.0], [0.0], [1.0], [1.0], [3.0]])
    rows = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0]], bool)
    with pytest.warns(UserWarning, match="2 of 6 queries"):
        result = evaluate(x, rows, metrics=RETRIEVAL, k=(1, 2, 3))
    rankings = slow_relevance_rankings(
        x, x, lambda i, j: shares_a_label(rows[i], rows[j]), True, "euclidean"
    )
    expected, skipped = slow_scores(rankings, (1, 2, 3))
    assert skipped == 2 and result["num_skipped"] == 2
    assert_matches(result, expected)
    # Query 0 {a}: candidates by (distance, index) 1 {a,b}, 2 {b}, 3, 4, 5 {a}: R = 2,
    # rel = [1, 0, 0, 0, 1], so AP@R = (1/2)(1/1) and RP = 1/2.
    assert count_relevant(rows, rows, exclude_self=True).tolist() == [2, 3, 1, 0, 0, 2]
    assert rankings[0] == [True, False, False, False, True]
