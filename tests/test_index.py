"""NeighbourIndex and Neighbours: exact search against a slow reference, ties, exclusion,
approximate kinds, faiss-free fallback, save/load round trips and input errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepmetric.index as index_module
from deepmetric.index import IndexFileError, NeighbourIndex, Neighbours, exact_search


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


# ---------------------------------------------------------------- damaged index files


def _good_file(tmp_path, kind="flat"):
    x, labels = clustered(200, 4, 5)
    index = NeighbourIndex(kind=kind, nlist=4)
    index.add(x, labels=labels)
    path = tmp_path / f"good-{kind}.npz"
    index.save(path)
    return path


def _rewrite(tmp_path, name, **arrays):
    path = tmp_path / f"{name}.npz"
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def _config(**changes):
    config = {"format_version": 1, "dim": 4, "metric": "l2", "kind": "flat", "nlist": 100,
              "nprobe": 8, "hnsw_m": 32, "ef_construction": 40, "ef_search": 64,
              "chunk_size": None} | changes  # fmt: skip
    return np.array(json.dumps({k: v for k, v in config.items() if v is not _DROP}))


_DROP = object()


def _damaged(tmp_path, damage):
    good = _good_file(tmp_path)
    vectors = np.zeros((3, 4), np.float32)
    if damage == "truncated":
        path = tmp_path / "truncated.npz"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "truncated member":
        # The central directory survives but the vectors' data is cut: a CRC/EOF error.
        data = bytearray(good.read_bytes())
        start = data.find(b"vectors.npy") + 200
        data[start : start + 400] = bytes(400)
        path = tmp_path / "crc.npz"
        path.write_bytes(bytes(data))
    elif damage == "not a zip":
        path = tmp_path / "text.npz"
        path.write_text("this is not an index\n")
    elif damage == "empty":
        path = tmp_path / "empty.npz"
        path.write_bytes(b"")
    elif damage == "pickle file":
        path = tmp_path / "pickle.npz"
        path.write_bytes(pickle.dumps({"vectors": vectors}))
    elif damage == "single array":
        path = tmp_path / "array.npz"
        np.save(open(path, "wb"), vectors)
    elif damage == "missing file":
        path = tmp_path / "nothing-here.npz"
    elif damage == "missing config":
        path = _rewrite(tmp_path, damage, vectors=vectors)
    elif damage == "missing vectors":
        path = _rewrite(tmp_path, damage, config=_config())
    elif damage == "config not json":
        path = _rewrite(tmp_path, damage, config=np.array("{dim: 4"), vectors=vectors)
    elif damage == "config not a string":
        path = _rewrite(tmp_path, damage, config=np.arange(3), vectors=vectors)
    elif damage == "config lacks a key":
        path = _rewrite(tmp_path, damage, config=_config(metric=_DROP), vectors=vectors)
    elif damage == "unknown setting":
        path = _rewrite(tmp_path, damage, config=_config(colour="red"), vectors=vectors)
    elif damage == "bad setting":
        path = _rewrite(tmp_path, damage, config=_config(metric="cosine"), vectors=vectors)
    elif damage == "other version":
        path = _rewrite(tmp_path, damage, config=_config(format_version=7), vectors=vectors)
    elif damage == "bad dim":
        path = _rewrite(tmp_path, damage, config=_config(dim=-2), vectors=vectors)
    elif damage == "vectors wrong width":
        path = _rewrite(tmp_path, damage, config=_config(dim=5), vectors=vectors)
    elif damage == "vectors 1-D":
        path = _rewrite(tmp_path, damage, config=_config(), vectors=np.zeros(4, np.float32))
    elif damage == "vectors float64":
        path = _rewrite(tmp_path, damage, config=_config(), vectors=vectors.astype(np.float64))
    elif damage == "vectors NaN":
        path = _rewrite(tmp_path, damage, config=_config(), vectors=vectors * np.nan)
    elif damage == "labels wrong length":
        path = _rewrite(tmp_path, damage, config=_config(), vectors=vectors, labels=np.arange(2))
    elif damage == "labels object array":
        objects = np.array([{"a": 1}, None, 3], dtype=object)
        path = _rewrite(tmp_path, damage, config=_config(), vectors=vectors, labels=objects)
    elif damage == "vectors object array":
        objects = np.array([[1.0, 2.0], None], dtype=object)
        path = _rewrite(tmp_path, damage, config=_config(), vectors=objects)
    elif damage == "faiss blob garbage":
        blob = np.frombuffer(b"not a faiss index at all", np.uint8)
        path = _rewrite(tmp_path, damage, config=_config(kind="hnsw"), faiss_index=blob)
    elif damage == "faiss blob wrong dim":
        blob = np.load(_good_file(tmp_path, "hnsw"))["faiss_index"]
        path = _rewrite(tmp_path, damage, config=_config(kind="hnsw", dim=9), faiss_index=blob)
    elif damage == "faiss blob truncated":
        blob = np.load(_good_file(tmp_path, "hnsw"))["faiss_index"]
        path = _rewrite(tmp_path, damage, config=_config(kind="hnsw"), faiss_index=blob[:-100])
    elif damage == "faiss blob not bytes":
        path = _rewrite(tmp_path, damage, config=_config(kind="hnsw"), faiss_index=vectors)
    return path


DAMAGES = [
    "truncated", "truncated member", "not a zip", "empty", "pickle file", "single array",
    "missing file", "missing config", "missing vectors", "config not json",
    "config not a string", "config lacks a key", "unknown setting", "bad setting",
    "other version", "bad dim", "vectors wrong width", "vectors 1-D", "vectors float64",
    "vectors NaN", "labels wrong length", "labels object array", "vectors object array",
    "faiss blob garbage", "faiss blob truncated", "faiss blob wrong dim",
    "faiss blob not bytes",
]  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_index_file_raises_one_clear_error(tmp_path, damage):
    path = _damaged(tmp_path, damage)
    with pytest.raises(IndexFileError) as caught:
        NeighbourIndex.load(path)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert str(path) in message and "deepmetric index" in message
    assert "allow_pickle" not in message
    # No chained numpy/zipfile/faiss traceback is shown under the message.
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_the_good_files_of_the_damage_test_load(tmp_path):
    for kind in ("flat", "hnsw"):
        assert len(NeighbourIndex.load(_good_file(tmp_path, kind))) == 200


def test_multi_hot_labels_round_trip(tmp_path):
    x, labels = clustered(50, 3, 4)
    rows = np.eye(4, dtype=bool)[labels] | (np.arange(50) % 7 == 0)[:, None]
    index = NeighbourIndex()
    index.add(x, labels=rows)
    path = tmp_path / "multi.npz"
    index.save(path)
    found = NeighbourIndex.load(path).search(x[:5], 3)
    assert found.labels.shape == (5, 3, 4)
    np.testing.assert_array_equal(found.labels, rows[found.indices])
