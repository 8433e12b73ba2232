"""Retrieval metrics against slow references written from the definitions (loops over
queries), scikit-learn's average_precision_score, hand-built cases and known values."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from deepmetric.index import Neighbours
from deepmetric.metrics import (
    count_relevant,
    evaluate,
    map_at_r,
    mean_reciprocal_rank,
    precision_at_1,
    r_precision,
    recall_at_k,
    retrieval_scores,
)

# ---------------------------------------------------------------- slow references


def slow_rankings(query, query_labels, reference=None, reference_labels=None, distance="l2"):
    """Labels of all references ranked for each query: by exact distance, ties by index."""
    exclude_self = reference is None
    if exclude_self:
        reference, reference_labels = query, query_labels
    query = np.asarray(query, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    rankings = []
    for i, q in enumerate(query):
        keyed = []
        for j, r in enumerate(reference):
            if exclude_self and i == j:
                continue
            d = float(((q - r) ** 2).sum()) if distance == "l2" else -float(q @ r)
            keyed.append((d, j))
        keyed.sort()
        rankings.append([reference_labels[j] for _, j in keyed])
    return rankings


def slow_metrics(rankings, query_labels, ks=(1, 2, 4, 8), knn_k=5, average="micro"):
    """Every retrieval metric from its definition, one query at a time."""
    per_query = {f"recall@{k}": [] for k in ks}
    for name in ("precision@1", "r_precision", "map@r", "mrr", "knn_accuracy"):
        per_query[name] = []
    kept_labels = []
    for label, ranking in zip(query_labels, rankings, strict=True):
        rel = [other == label for other in ranking]
        r = sum(rel)
        if r == 0:
            continue
        kept_labels.append(label)
        for k in ks:
            per_query[f"recall@{k}"].append(float(any(rel[:k])))
        per_query["precision@1"].append(float(rel[0]))
        per_query["r_precision"].append(sum(rel[:r]) / r)
        ap = 0.0
        for j in range(r):
            if rel[j]:
                ap += sum(rel[: j + 1]) / (j + 1)
        per_query["map@r"].append(ap / r)
        per_query["mrr"].append(1.0 / (rel.index(True) + 1))
        votes = Counter(ranking[:knn_k])
        best = max(votes.values())
        predicted = next(x for x in ranking[:knn_k] if votes[x] == best)
        per_query["knn_accuracy"].append(float(predicted == label))
    out = {}
    for name, values in per_query.items():
        if not values:
            out[name] = float("nan")
        elif average == "micro":
            out[name] = float(np.mean(values))
        else:
            by_class = {}
            for label, value in zip(kept_labels, values, strict=True):
                by_class.setdefault(label, []).append(value)
            out[name] = float(np.mean([np.mean(v) for v in by_class.values()]))
    return out


RETRIEVAL = ("recall@k", "precision@1", "r_precision", "map@r", "mrr", "knn_accuracy")


def assert_matches(result, expected):
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-12, nan_ok=True), name


# ---------------------------------------------------------------- against the slow reference


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_evaluate_matches_slow_reference(data):
    # Integer coordinates in a small range: exact float32 distances and many ties.
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n = data.draw(st.integers(6, 40))
    dim = data.draw(st.integers(1, 3))
    num_classes = data.draw(st.integers(1, 6))
    x = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=n)
    separate = data.draw(st.booleans())
    distance = data.draw(st.sampled_from(["euclidean", "dot"]))
    average = data.draw(st.sampled_from(["micro", "macro"]))
    if separate:
        m = data.draw(st.integers(1, 15))
        query = rng.integers(-2, 3, size=(m, dim)).astype(np.float32)
        query_labels = rng.integers(0, num_classes, size=m)
        reference, reference_labels = x, labels
    else:
        query, query_labels, reference, reference_labels = x, labels, None, None
    candidates = n - (not separate)
    ks = tuple(sorted(set(data.draw(st.lists(st.integers(1, candidates), min_size=1)))))
    knn_k = data.draw(st.integers(1, candidates))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate(
            query, query_labels, reference, reference_labels, metrics=RETRIEVAL, k=ks,
            distance=distance, average=average, knn_k=knn_k,
            chunk_size=data.draw(st.sampled_from([None, 1, 7])),
        )  # fmt: skip
    rankings = slow_rankings(
        query, query_labels, reference, reference_labels, "l2" if distance == "euclidean" else "ip"
    )
    expected = slow_metrics(rankings, query_labels, ks, knn_k, average)
    assert_matches(result, expected)
    pairs = zip(query_labels, rankings, strict=True)
    assert result["num_skipped"] == sum(not any(r == y for r in rk) for y, rk in pairs)


def test_continuous_embeddings_and_cosine_match_slow_reference():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((120, 8)).astype(np.float32)
    labels = rng.integers(0, 6, size=120)
    result = evaluate(x, labels, metrics=RETRIEVAL, k=(1, 3, 10), distance="cosine")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = slow_metrics(slow_rankings(unit, labels, distance="ip"), labels, (1, 3, 10))
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-9), name


def test_average_precision_at_r_agrees_with_sklearn():
    # AP@R = (hits in the first R / R) * AP of the first R neighbours (scikit-learn's AP).
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    labels = rng.integers(0, 5, size=200)
    rankings = slow_rankings(x, labels)
    r = count_relevant(labels, labels, exclude_self=True)
    depth = int(r.max())
    rows = [[int(label) for label in ranking[:depth]] for ranking in rankings]
    found = Neighbours(np.tile(np.arange(depth), (200, 1)), np.zeros((200, depth)), np.array(rows))
    ours = retrieval_scores(found, labels, r, ks=(1,)).average_precision_at_r
    for i in range(200):
        rel = np.array(rows[i][: r[i]]) == labels[i]
        reference = 0.0
        if rel.any():
            sk = average_precision_score(rel, -np.arange(r[i]))
            reference = sk * rel.sum() / r[i]
        assert ours[i] == pytest.approx(reference, abs=1e-12)


# ---------------------------------------------------------------- hand-built cases


def one_row(labels, query_label, num_relevant):
    labels = np.array([labels])
    found = Neighbours(np.arange(labels.shape[1])[None], np.zeros(labels.shape), labels)
    return found, [query_label], [num_relevant]


def test_map_at_r_is_not_open_metric_learnings_map_at_k():
    # 4 relevant items, retrieved as [hit, miss, miss, miss, miss]: MAP@R = (1/4) * 1.
    found, y, r = one_row(["a", "b", "b", "b", "b"], "a", 4)
    assert map_at_r(found, y, r) == 0.25
    assert r_precision(found, y, r) == 0.25
    assert precision_at_1(found, y, r) == 1.0
    assert recall_at_k(found, y, r, k=4) == 1.0
    assert mean_reciprocal_rank(found, y, r) == 1.0


def test_hand_computed_values():
    # R = 3 and rel = [0, 1, 1, 0, 1]: AP@R = (1/3)(1/2 + 2/3), RP = 2/3, RR = 1/2.
    found, y, r = one_row([0, 7, 7, 0, 7], 7, 3)
    assert map_at_r(found, y, r) == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert r_precision(found, y, r) == pytest.approx(2 / 3)
    assert mean_reciprocal_rank(found, y, r) == 0.5
    assert recall_at_k(found, y, r, k=1) == 0.0
    assert recall_at_k(found, y, r, k=2) == 1.0


def test_same_via_evaluate_with_query_set_different_from_reference():
    # One query at 0; references on a line: a at 1, b at 2..5, a at 10, 11, 12 -> R = 4 and
    # the ranking is [hit, miss, miss, miss, miss, hit, hit, hit].
    reference = np.array([[1.0], [2.0], [3.0], [4.0], [5.0], [10.0], [11.0], [12.0]])
    labels = ["a", "b", "b", "b", "b", "a", "a", "a"]
    result = evaluate(np.zeros((1, 1)), ["a"], reference, labels, metrics=RETRIEVAL, k=(1, 5))
    assert result["map@r"] == 0.25
    assert result["r_precision"] == 0.25
    assert result["recall@1"] == 1.0
    assert result["mrr"] == 1.0
    assert result["knn_accuracy"] == 0.0


def test_ties_are_broken_by_reference_index():
    # References 0 (label b) and 1 (label a) tie at distance 1 from the query: b comes first.
    reference = np.array([[1.0], [-1.0], [5.0]])
    result = evaluate(np.zeros((1, 1)), ["a"], reference, ["b", "a", "a"], metrics=RETRIEVAL,
                      k=(1, 2), knn_k=1)  # fmt: skip
    assert result["recall@1"] == 0.0
    assert result["recall@2"] == 1.0
    assert result["mrr"] == 0.5
    assert result["map@r"] == pytest.approx((1 / 2) / 2)
    flipped = evaluate(np.zeros((1, 1)), ["a"], reference, ["a", "b", "a"], metrics=RETRIEVAL,
                       k=(1, 2), knn_k=1)  # fmt: skip
    assert flipped["recall@1"] == 1.0


def test_duplicates_of_the_query_do_not_count_as_the_query_itself():
    # Three identical points of one class: each query must still see the two others.
    x = np.zeros((3, 2), dtype=np.float32)
    result = evaluate(x, [1, 1, 1], metrics=("map@r", "recall@k"), k=(1, 2))
    assert result["map@r"] == 1.0
    assert result["recall@1"] == 1.0


def test_mrr_beyond_the_search_depth_is_exact():
    # R = 1 and K = 1, so one neighbour is searched; the relevant reference is 11th.
    reference = np.concatenate([np.arange(1, 11)[:, None], [[50.0]]]).astype(np.float32)
    labels = ["b"] * 10 + ["a"]
    result = evaluate(np.zeros((1, 1)), ["a"], reference, labels, metrics=("mrr",), k=1)
    assert result["mrr"] == pytest.approx(1 / 11)
    # With a tie: the relevant item (index 10) ties with reference 4 (distance 5): rank 6.
    reference[10, 0] = -5.0
    result = evaluate(np.zeros((1, 1)), ["a"], reference, labels, metrics=("mrr",), k=1)
    assert result["mrr"] == pytest.approx(1 / 6)


def test_functional_api_refuses_unknown_ranks_and_short_lists():
    found, y, r = one_row([0, 0], 7, 3)
    with pytest.raises(ValueError, match="search with k >= 3"):
        map_at_r(found, y, r)
    with pytest.raises(ValueError, match="rank is unknown"):
        mean_reciprocal_rank(found, y, [1])
    with pytest.raises(ValueError, match="include_mrr=False"):
        retrieval_scores(found, y, [2], ks=(1,)).summary()
    assert retrieval_scores(found, y, [2], ks=(1,)).summary(include_mrr=False)["map@r"] == 0.0
    with pytest.raises(ValueError, match="no labels"):
        map_at_r(Neighbours(np.zeros((1, 1)), np.zeros((1, 1))), [0], [1])


# ---------------------------------------------------------------- singletons and averages


def test_singleton_class_queries_are_reported_and_skipped():
    x = np.array([[0.0], [0.1], [1.0], [1.1], [5.0]])
    labels = ["a", "a", "b", "b", "lonely"]
    with pytest.warns(UserWarning, match=r"1 of 5 queries .*'lonely'"):
        result = evaluate(x, labels, metrics=RETRIEVAL, k=(1,), knn_k=1)
    assert result["num_skipped"] == 1
    assert result["num_queries"] == 5
    for name in ("recall@1", "map@r", "mrr", "knn_accuracy"):
        assert result[name] == 1.0, name
    with pytest.warns(UserWarning):
        alone = evaluate(x[:2], ["a", "b"], metrics=("map@r",), k=1)
    assert np.isnan(alone["map@r"])


def test_macro_average_weights_classes_equally():
    # Class a: 3 queries with P@1 = 1; class b: 2 queries, one right, one wrong.
    x = np.array([[0.0], [0.1], [0.2], [3.0], [3.05], [3.1]])
    labels = np.array([0, 0, 0, 1, 1, 0])
    micro = evaluate(x, labels, metrics=("precision@1",), average="micro")
    macro = evaluate(x, labels, metrics=("precision@1",), average="macro")
    rankings = slow_rankings(x, labels)
    assert micro["precision@1"] == slow_metrics(rankings, labels)["precision@1"]
    assert macro["precision@1"] == slow_metrics(rankings, labels, average="macro")["precision@1"]
    assert micro["precision@1"] != macro["precision@1"]


# ---------------------------------------------------------------- labels of every kind


@pytest.mark.parametrize(
    "relabel",
    [
        lambda y: np.array([f"class-{v}" for v in y]),
        lambda y: y.astype(np.int64) + 2**60,  # distinct ints that collide as float64
        lambda y: y.astype(np.uint64) + np.uint64(2**63 + 5),  # beyond int64
        lambda y: np.array([int(v) + 2**70 for v in y], dtype=object),  # beyond 64 bits
        lambda y: torch.as_tensor(y, dtype=torch.int64) - 2**62,
        lambda y: [str(v) for v in y],
    ],
)
def test_labels_of_any_kind_are_compared_exactly(relabel):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=60)
    assert float(2**60) == float(2**60 + 1)  # why the float cast would be wrong
    baseline = evaluate(x, y, metrics=RETRIEVAL + ("nmi", "ami"), k=(1, 4))
    assert evaluate(x, relabel(y), metrics=RETRIEVAL + ("nmi", "ami"), k=(1, 4)) == baseline


def test_large_integer_labels_one_apart_are_different_classes():
    x = np.array([[0.0], [0.1], [0.2], [0.3]])
    labels = np.array([2**60, 2**60 + 1, 2**60, 2**60 + 1])
    result = evaluate(x, labels, metrics=("precision@1",), k=1)
    assert result["precision@1"] == 0.0


def test_torch_inputs_equal_numpy_inputs():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=50)
    as_numpy = evaluate(x, y, metrics=RETRIEVAL, k=(1, 2))
    as_torch = evaluate(torch.from_numpy(x), torch.from_numpy(y), metrics=RETRIEVAL, k=(1, 2))
    assert as_numpy == as_torch


# ---------------------------------------------------------------- known values


def test_perfect_embeddings_score_one():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(8), 12)
    x = (100 * rng.standard_normal((8, 16)))[labels] + rng.standard_normal((96, 16))
    result = evaluate(x, labels, k=(1, 2, 4, 8))
    for name, value in result.items():
        if name not in ("num_queries", "num_skipped"):
            assert value == pytest.approx(1.0), name


def test_random_embeddings_score_chance():
    # Labels independent of the embeddings: each query's ranking sees a random arrangement of
    # R relevant among M candidates, so E[rel(j)] = R/M and E[rel(j) rel(l)] = R(R-1)/(M(M-1))
    # for j != l, which gives E[AP@R] = (1/R) sum_j (R/M + (j-1) R(R-1)/(M(M-1))) / j.
    rng = np.random.default_rng(8)
    n, num_classes = 1200, 6
    labels = rng.permutation(np.repeat(np.arange(num_classes), n // num_classes))
    x = rng.standard_normal((n, 32)).astype(np.float32)
    result = evaluate(x, labels, metrics=("recall@k", "map@r", "r_precision"), k=(1,))
    r, m = n // num_classes - 1, n - 1
    p, q = r / m, r * (r - 1) / (m * (m - 1))
    chance_map = sum((p + (j - 1) * q) / j for j in range(1, r + 1)) / r
    assert result["map@r"] == pytest.approx(chance_map, rel=0.1)
    assert result["r_precision"] == pytest.approx(p, rel=0.1)
    assert result["recall@1"] == pytest.approx(p, abs=0.05)
