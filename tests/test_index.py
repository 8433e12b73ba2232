"""NeighbourIndex and Neighbours: exact search against a slow reference, ties, exclusion,
approximate kinds, faiss-free fallback, save/load round trips and input errors."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepmetric.index as index_module
from deepmetric.index import NeighbourIndex, Neighbours, exact_search


def slow_search(queries, reference, k, metric="l2", exclude=None):
    """Rank every reference for every query with Python loops, ties by reference index."""
    queries = np.asarray(queries, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    rows_idx, rows_dist = [], []
    for i, q in enumerate(queries):
        ranked = []
        for j, r in enumerate(reference):
            if exclude is not None and j == exclude[i]:
                continue
            d = float(((q - r) ** 2).sum()) if metric == "l2" else -float(q @ r)
            ranked.append((d, j))
        ranked.sort()
        rows_idx.append([j for _, j in ranked[:k]])
        rows_dist.append([d for d, _ in ranked[:k]])
    return np.array(rows_idx, dtype=np.int64), np.array(rows_dist)


BACKENDS = ["faiss", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_exact_search_matches_slow_reference_with_ties(backend, metric, data):
    # Small integer coordinates: every distance is exact in float32 and ties are frequent.
    n = data.draw(st.integers(2, 30))
    dim = data.draw(st.integers(1, 3))
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    reference = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    self_search = data.draw(st.booleans())
    if self_search:
        queries, exclude = reference, np.arange(n)
    else:
        queries, exclude = rng.integers(-2, 3, size=(data.draw(st.integers(1, 20)), dim)), None
    k = data.draw(st.integers(1, n - int(self_search)))
    index = NeighbourIndex(metric=metric, backend=backend)
    index.add(reference, labels=np.arange(n) * 10)
    found = index.search(queries, k, exclude=exclude)
    expected_idx, expected_dist = slow_search(queries, reference, k, metric, exclude)
    np.testing.assert_array_equal(found.indices, expected_idx)
    np.testing.assert_array_equal(found.distances, expected_dist.astype(np.float32))
    np.testing.assert_array_equal(found.labels, expected_idx * 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_exclusion_when_the_query_is_not_among_the_candidates(backend):
    # Ten exact duplicates: for query 7, references 0..6 tie with it at distance 0 and come
    # first, so the k + 1 = 3 candidates do not contain the query itself.
    x = np.zeros((10, 4), dtype=np.float32)
    x = np.concatenate([x, np.ones((3, 4), dtype=np.float32)])
    index = NeighbourIndex(backend=backend)
    index.add(x)
    found = index.search(x, 2, exclude=np.arange(len(x)))
    expected, _ = slow_search(x, x, 2, exclude=np.arange(len(x)))
    np.testing.assert_array_equal(found.indices, expected)
    assert found.indices[7].tolist() == [0, 1]
    assert found.indices[0].tolist() == [1, 2]
    assert all(i not in row for i, row in enumerate(found.indices))


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_data_matches_slow_reference(backend):
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    index = NeighbourIndex(backend=backend)
    index.add(reference)
    found = index.search(queries, 12)
    expected_idx, expected_dist = slow_search(queries, reference, 12)
    np.testing.assert_array_equal(found.indices, expected_idx)
    np.testing.assert_allclose(found.distances, expected_dist, rtol=1e-4, atol=1e-4)


def test_torch_search_in_small_chunks_equals_one_block():
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 4, size=(101, 3)).astype(np.float32)
    whole = exact_search(x, x, 7, exclude=np.arange(101))
    chunked = exact_search(x, x, 7, exclude=np.arange(101), chunk_size=4)
    np.testing.assert_array_equal(whole.indices, chunked.indices)
    np.testing.assert_array_equal(whole.distances, chunked.distances)


def test_faiss_absent_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(index_module, "_load_faiss", lambda: None)
    index = NeighbourIndex()
    assert index.backend == "torch"
    x = np.random.default_rng(2).integers(-2, 3, size=(50, 3)).astype(np.float32)
    index.add(x)
    found = index.search(x, 5, exclude=np.arange(50))
    np.testing.assert_array_equal(found.indices, slow_search(x, x, 5, exclude=np.arange(50))[0])
    with pytest.raises(ValueError, match="needs faiss"):
        NeighbourIndex(kind="hnsw")
    with pytest.raises(ImportError, match="faiss"):
        NeighbourIndex(backend="faiss")


def clustered(n, dim, num_classes, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    centres = rng.standard_normal((num_classes, dim))
    return (centres[labels] + noise * rng.standard_normal((n, dim))).astype(np.float32), labels


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_approximate_kinds_find_most_exact_neighbours(kind, metric):
    x, _ = clustered(2000, 16, 20)
    exact = NeighbourIndex(metric=metric)
    exact.add(x)
    approx = NeighbourIndex(metric=metric, kind=kind, nlist=20, nprobe=5)
    approx.add(x)
    assert not approx.exact
    truth = exact.search(x[:200], 10, exclude=np.arange(200)).indices
    found = approx.search(x[:200], 10, exclude=np.arange(200))
    overlap = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(truth, found.indices, strict=True)]
    )
    assert overlap > 0.9
    assert all(i not in row for i, row in enumerate(found.indices))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labels", [np.arange(60) * 7, np.array([f"c{i % 5}" for i in range(60)])])
def test_flat_save_load_round_trip(tmp_path, backend, labels):
    x, _ = clustered(60, 8, 5)
    index = NeighbourIndex(metric="ip", backend=backend)
    index.add(x[:30], labels=labels[:30])
    index.add(x[30:], labels=labels[30:])
    path = tmp_path / "index.npz"
    index.save(path)
    for load_backend in BACKENDS:
        loaded = NeighbourIndex.load(path, backend=load_backend)
        assert (loaded.metric, loaded.kind, len(loaded), loaded.dim) == ("ip", "flat", 60, 8)
        before, after = index.search(x, 6), loaded.search(x, 6)
        np.testing.assert_array_equal(before.indices, after.indices)
        np.testing.assert_array_equal(before.labels, after.labels)
        np.testing.assert_allclose(before.distances, after.distances, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_save_load_round_trip(tmp_path, kind):
    x, labels = clustered(1000, 8, 10)
    index = NeighbourIndex(kind=kind, nlist=10, nprobe=3, ef_search=32)
    index.add(x, labels=labels)
    path = tmp_path / f"{kind}.npz"
    index.save(path)
    loaded = NeighbourIndex.load(path)
    assert (loaded.kind, loaded.nprobe, loaded.ef_search, len(loaded)) == (kind, 3, 32, 1000)
    before, after = index.search(x[:50], 5), loaded.search(x[:50], 5)
    np.testing.assert_array_equal(before.indices, after.indices)
    np.testing.assert_array_equal(before.labels, after.labels)


def test_neighbours_is_read_only_and_checks_itself():
    found = Neighbours(np.array([[2, 0]]), np.array([[0.5, 1.0]]), np.array([["b", "a"]]))
    with pytest.raises(ValueError):
        found.indices[0, 0] = 1
    with pytest.raises(AttributeError):
        found.indices = np.zeros((1, 2))
    with pytest.raises(ValueError, match="sorted"):
        Neighbours(np.array([[0, 1]]), np.array([[1.0, 0.5]]))
    with pytest.raises(ValueError, match="twice"):
        Neighbours(np.array([[3, 3]]), np.array([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="shape"):
        Neighbours(np.array([[0, 1]]), np.array([[0.5]]))
    with pytest.raises(ValueError, match=r"\+inf"):
        Neighbours(np.array([[0, -1]]), np.array([[0.5, 0.7]]))
    padded = Neighbours(np.array([[4, -1]]), np.array([[0.5, np.inf]]))
    assert padded.head(1).indices.tolist() == [[4]]
    assert padded.with_labels(np.array(["a", "b", "c", "d", "e"])).labels[0, 0] == "e"


def test_search_errors_name_the_argument_and_the_fix():
    index = NeighbourIndex()
    with pytest.raises(ValueError, match="empty"):
        index.search(np.zeros((1, 2)), 1)
    index.add(np.eye(3))
    with pytest.raises(ValueError, match=r"k=3 .* 2 candidates .* between 1 and 2"):
        index.search(np.eye(3), 3, exclude=np.arange(3))
    with pytest.raises(ValueError, match="dim 2 but the index has dim 3"):
        index.search(np.zeros((1, 2)), 1)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 3), np.nan), 1)
    with pytest.raises(ValueError, match="exclude"):
        index.search(np.eye(3), 1, exclude=np.arange(2))
    with pytest.raises(ValueError, match="one label per row"):
        index.add(np.eye(3), labels=np.arange(2))
    with pytest.raises(ValueError, match="kind"):
        NeighbourIndex(kind="lsh")
    with pytest.raises(ValueError, match="nlist"):
        NeighbourIndex(kind="ivf", nlist=50).add(np.eye(3))


def test_accepts_torch_tensors():
    x = torch.tensor([[0.0], [1.0], [3.0]])
    found = exact_search(x, x, 1, exclude=torch.arange(3))
    assert found.indices.ravel().tolist() == [1, 0, 1]


def test_docstring_examples_run():
    failures, _ = doctest.testmod(index_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert failures == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_after_a_second_add_sees_every_vector(backend):
    # Integer data forces the exact tie path, which caches the reference; a later add must
    # not leave a stale cache behind.
    rng = np.random.default_rng(3)
    first = rng.integers(-1, 2, size=(40, 2)).astype(np.float32)
    second = rng.integers(-1, 2, size=(400, 2)).astype(np.float32)
    index = NeighbourIndex(backend=backend)
    index.add(first)
    index.search(first, 3)
    index.add(second)
    both = np.concatenate([first, second])
    queries = both[:30]
    expected, _ = slow_search(queries, both, 5)
    np.testing.assert_array_equal(index.search(queries, 5).indices, expected)
