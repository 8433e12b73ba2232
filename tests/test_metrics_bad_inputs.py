"""SPEC section 9 for every public function of deepmetric.metrics and deepmetric.index:
NaN/inf and badly shaped embeddings, bad labels, unknown metric names and K larger than the
reference set fail with a ValueError/TypeError naming the argument; valid inputs at any scale
give finite scores in [0, 1]."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmetric.index import NeighbourIndex, exact_search
from deepmetric.metrics import (
    METRIC_NAMES,
    average_over_queries,
    clustering_scores,
    count_relevant,
    evaluate,
    kmeans,
    kmeans_plus_plus,
    knn_accuracy,
    knn_predict,
    map_at_r,
    margin_diagnostics,
    mean_reciprocal_rank,
    precision_at_1,
    r_precision,
    recall_at_k,
    relevance,
    retrieval_scores,
    sample_pairs,
    verification_metrics,
)
from deepmetric.neighbours import Neighbours

RNG = np.random.default_rng(0)
X = RNG.standard_normal((12, 3)).astype(np.float32)
Y = np.arange(12) % 3
FOUND = exact_search(X, X, 4, exclude=np.arange(12), reference_labels=Y)
R = count_relevant(Y, Y, exclude_self=True)


def _index_search(x):
    index = NeighbourIndex()
    index.add(X)
    return index.search(x, 2)


# Each entry: (name of the embeddings argument, call with bad embeddings in that place).
EMBEDDING_TAKERS = {
    "evaluate(query)": ("query", lambda x: evaluate(x, np.arange(len(x)) % 2)),
    "evaluate(reference)": (
        "reference",
        lambda x: evaluate(X, Y, x, np.arange(len(x)) % 3, metrics="map@r"),
    ),
    "clustering_scores": ("embeddings", lambda x: clustering_scores(x, np.arange(len(x)) % 2)),
    "kmeans": ("embeddings", lambda x: kmeans(x, 1)),
    "kmeans_plus_plus": ("embeddings", lambda x: kmeans_plus_plus(x, 1)),
    "margin_diagnostics": (
        "query",
        lambda x: margin_diagnostics(x, np.arange(len(x)) % 2, FOUND.head(1)),
    ),
    "NeighbourIndex.add": ("embeddings", lambda x: NeighbourIndex().add(x)),
    "NeighbourIndex.search": ("queries", _index_search),
    "exact_search": ("queries", lambda x: exact_search(x, X, 1)),
}


@settings(max_examples=60, deadline=None)
@given(
    taker=st.sampled_from(sorted(EMBEDDING_TAKERS)),
    rows=st.integers(2, 8),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    where=st.integers(0, 10**6),
    as_tensor=st.booleans(),
)
def test_nan_or_inf_embeddings_are_refused_naming_the_argument(taker, rows, bad, where, as_tensor):
    name, call = EMBEDDING_TAKERS[taker]
    x = RNG.standard_normal((rows, 3)).astype(np.float32)
    x.flat[where % x.size] = bad
    with pytest.raises(ValueError, match=rf"{name} contains NaN or inf"):
        call(torch.from_numpy(x) if as_tensor else x)


@settings(max_examples=60, deadline=None)
@given(
    taker=st.sampled_from(sorted(EMBEDDING_TAKERS)),
    shape=st.sampled_from([(5,), (2, 3, 1), (0, 3), (4, 0)]),
)
def test_badly_shaped_embeddings_are_refused_naming_the_argument(taker, shape):
    name, call = EMBEDDING_TAKERS[taker]
    if shape == (0, 3) and taker.startswith(("NeighbourIndex", "exact")):
        return  # adding or searching zero rows is valid for an index
    with pytest.raises(ValueError, match=rf"{name} (must be 2-D|is empty|has no columns)"):
        call(np.zeros(shape, np.float32))


@settings(max_examples=80, deadline=None)
@given(name=st.text(min_size=1, max_size=12))
def test_unknown_metric_names_are_refused_with_the_valid_ones(name):
    valid = name in METRIC_NAMES or (
        name.startswith("recall@") and name[7:].isdigit() and int(name[7:]) >= 1
    )
    if valid:
        return
    with pytest.raises(ValueError, match="unknown metric .* valid names are recall@k"):
        evaluate(X, Y, metrics=[name])


@settings(max_examples=40, deadline=None)
@given(
    num_reference=st.integers(1, 12),
    extra=st.integers(1, 5),
    separate=st.booleans(),
    which=st.sampled_from(["k", "knn_k", "recall@"]),
)
def test_k_larger_than_the_reference_set_is_refused(num_reference, extra, separate, which):
    if separate:
        args = (X, Y, X[:num_reference], Y[:num_reference])
        candidates = num_reference
    else:
        args = (X[:num_reference], Y[:num_reference])
        candidates = num_reference - 1
    too_many = candidates + extra
    if which == "k":
        call, match = lambda: evaluate(*args, k=(1, too_many)), rf"Recall@{too_many}.*at most"
    elif which == "knn_k":
        call = lambda: evaluate(*args, metrics="knn_accuracy", knn_k=too_many)  # noqa: E731
        match = rf"knn_k={too_many}.*knn_k <= {candidates}"
    else:
        call, match = lambda: evaluate(*args, metrics=f"recall@{too_many}"), "at most"
    if candidates < 1:
        match = "candidate references"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match=r"k=\d+ but the index holds"):
        exact_search(X, X[:num_reference], num_reference + extra)


NEIGHBOUR_FUNCTIONS = {
    "recall_at_k": lambda labels: recall_at_k(FOUND, labels, R, k=1),
    "precision_at_1": lambda labels: precision_at_1(FOUND, labels, R),
    "r_precision": lambda labels: r_precision(FOUND, labels, R),
    "map_at_r": lambda labels: map_at_r(FOUND, labels, R),
    "mean_reciprocal_rank": lambda labels: mean_reciprocal_rank(FOUND, labels, R),
    "retrieval_scores": lambda labels: retrieval_scores(FOUND, labels, R, ks=1),
    "relevance": lambda labels: relevance(FOUND, labels),
    "knn_accuracy": lambda labels: knn_accuracy(FOUND, labels, k=3),
    "count_relevant": lambda labels: count_relevant(labels, Y),
    "average_over_queries": lambda labels: average_over_queries(
        np.ones(12), labels, average="macro"
    ),
    "evaluate": lambda labels: evaluate(X, labels),
    "clustering_scores": lambda labels: clustering_scores(X, labels),
}


@pytest.mark.parametrize("function", sorted(NEIGHBOUR_FUNCTIONS))
def test_float_and_mis_sized_labels_are_refused(function):
    call = NEIGHBOUR_FUNCTIONS[function]
    with pytest.raises(TypeError, match=r"labels has dtype float.*integers or strings"):
        call(Y.astype(np.float64) + 0.5)
    with pytest.raises(TypeError, match=r"labels has dtype torch.float32"):
        call(torch.from_numpy(Y).float())
    if function != "count_relevant":
        with pytest.raises(ValueError, match="labels has 11 entries"):
            call(Y[:11])
    with pytest.raises(ValueError, match="1-D"):
        call(np.zeros((12, 2, 2), np.int64))


def test_other_arguments_are_checked_at_the_entry():
    with pytest.raises(ValueError, match="num_pairs must be an integer >= 1"):
        evaluate(X, Y, metrics="verification", num_pairs=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        evaluate(X, Y, metrics="nmi", seed=-1)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        evaluate(X, Y, metrics="map@r", chunk_size=0)
    with pytest.raises(ValueError, match="k must be an integer >= 1 or a sequence"):
        evaluate(X, Y, k=1.5)
    with pytest.raises(ValueError, match="average must be one of"):
        evaluate(X, Y, average="weighted")
    with pytest.raises(ValueError, match="distance must be one of"):
        evaluate(X, Y, distance="manhattan")
    with pytest.raises(ValueError, match="num_clusters must be between 1 and 12"):
        kmeans_plus_plus(X, 13)
    with pytest.raises(ValueError, match="query_labels must be non-negative integer class codes"):
        sample_pairs(Y.astype(float), Y, 3)
    with pytest.raises(ValueError, match="far values must lie in"):
        verification_metrics([0.1, 0.2], [True, False], far=[np.nan])
    with pytest.raises(ValueError, match="values contains NaN"):
        average_over_queries([np.nan, 1.0], [0, 1])
    with pytest.raises(ValueError, match="valid has shape"):
        average_over_queries([1.0, 1.0], [0, 1], valid=[True])
    with pytest.raises(ValueError, match=r"k=5 but neighbours has only k=4"):
        knn_predict(FOUND, 5)
    with pytest.raises(ValueError, match=r"exclude holds positions outside \[-1, 11\]"):
        exact_search(X, X, 2, exclude=np.full(12, 12))
    with pytest.raises(ValueError, match="distances contains NaN"):
        Neighbours(np.array([[0]]), np.array([[np.nan]]))


@settings(max_examples=20, deadline=None)
@given(
    scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e2, 1e4]),
    duplicates=st.booleans(),
    zero_rows=st.integers(0, 3),
    num_classes=st.integers(1, 5),
    distance=st.sampled_from(["euclidean", "dot"]),
    seed=st.integers(0, 1000),
)
def test_valid_inputs_at_any_scale_give_finite_scores(
    scale, duplicates, zero_rows, num_classes, distance, seed
):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((30, 4)) * scale).astype(np.float32)
    if duplicates:
        x[10:20] = x[:10]
    x[:zero_rows] = 0.0
    labels = rng.integers(0, num_classes, size=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate(x, labels, k=(1, 2, 4), distance=distance)
    scores = {k: v for k, v in result.items() if k not in ("num_queries", "num_skipped")}
    for name, value in scores.items():
        assert np.isfinite(value) or (name in ("nmi", "ami") and num_classes == 1), name
        if name != "ami" and np.isfinite(value):
            assert -1e-9 <= value <= 1 + 1e-9, name
