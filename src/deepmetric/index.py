"""Nearest-neighbour search: a small k-NN index over faiss and its immutable result.

`NeighbourIndex` stores reference embeddings (and optionally their labels) and answers k-NN
queries. The default is exact flat search; IVF and HNSW are approximate options. When faiss
is not installed, exact search runs in pure torch, chunked over queries so that memory stays
bounded. Every search returns a `Neighbours` value that the metrics in `deepmetric.metrics`
take.

Tie rule (exact search): neighbours are ordered by distance, and references at the same
distance by ascending reference index. The set of k neighbours follows the same rule: when
the k-th and the (k+1)-th candidates are at the same distance, the references with the lowest
indices among those at that distance are kept. "Same distance" means equal computed float32
values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["METRICS", "KINDS", "Neighbours", "NeighbourIndex", "exact_search"]

METRICS = ("l2", "ip")
KINDS = ("flat", "ivf", "hnsw")
BACKENDS = ("auto", "faiss", "torch")

# Upper bound on the number of float32 entries of one (queries x references) distance block in
# the torch search (2**24 entries = 64 MiB).
_BLOCK_ENTRIES = 1 << 24
_FORMAT_VERSION = 1


def _load_faiss() -> Any:
    """Return the faiss module, or None when it is not installed (tests monkeypatch this)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@dataclass(frozen=True, eq=False)
class Neighbours:
    """The k nearest references of each query, as one read-only value.

    Row ``i`` lists the references closest to query ``i``, closest first: ``indices[i, j]`` is
    the position of the j-th neighbour in the reference set, ``distances[i, j]`` its distance
    and ``labels[i, j]`` its label. Distances are squared Euclidean for ``metric="l2"`` and
    the negated inner product ``-<q, r>`` for ``metric="ip"``, so smaller is always closer.
    Ties are ordered by ascending reference index. An approximate index may find fewer than k
    references; missing entries have index -1 and distance +inf and sit at the end of the row
    (their ``labels`` entries are meaningless; metrics mask them by ``indices >= 0``).

    The constructor checks the invariants (shapes, sorted rows, unique indices per row) and
    stores read-only copies, in the spirit of open-metric-learning's retrieval results.

    Parameters:
        indices: (num_queries, k) integer reference positions, -1 for "none found".
        distances: (num_queries, k) float distances, non-decreasing along each row.
        labels: optional (num_queries, k) labels of the neighbours, any dtype.
        metric: "l2" or "ip", the geometry the distances come from.

    Example:
        >>> nb = Neighbours(np.array([[1, 0]]), np.array([[0.5, 2.0]]))
        >>> nb.k, int(nb.indices[0, 0])
        (2, 1)
    """

    indices: np.ndarray
    distances: np.ndarray
    labels: np.ndarray | None = None
    metric: str = "l2"

    def __post_init__(self) -> None:
        self._check_and_freeze(copy=True)

    @classmethod
    def _adopt(
        cls, indices: np.ndarray, distances: np.ndarray, labels: np.ndarray | None, metric: str
    ) -> Neighbours:
        """Build from arrays that nobody else holds: checked and frozen, but not copied."""
        value = cls.__new__(cls)
        for name, field in (("indices", indices), ("distances", distances), ("labels", labels),
                            ("metric", metric)):  # fmt: skip
            object.__setattr__(value, name, field)
        value._check_and_freeze(copy=False)
        return value

    def _check_and_freeze(self, copy: bool) -> None:
        indices = np.array(self.indices, dtype=np.int64, copy=copy)
        distances = np.array(self.distances, dtype=np.float32, copy=copy)
        if indices.ndim != 2:
            raise ValueError(f"indices must be 2-D (num_queries, k), got shape {indices.shape}")
        if distances.shape != indices.shape:
            raise ValueError(
                f"distances has shape {distances.shape} but indices has shape {indices.shape}"
            )
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if np.isnan(distances).any():
            raise ValueError("distances contains NaN")
        missing = indices < 0
        if (indices < -1).any():
            raise ValueError("indices must be >= 0, or -1 for 'no neighbour found'")
        if not np.all(distances[missing] == np.inf):
            raise ValueError("entries with index -1 must have distance +inf")
        if indices.shape[1] > 1:
            if not np.all(distances[:, 1:] >= distances[:, :-1]):
                raise ValueError("each row of distances must be sorted, closest first")
            ordered = np.sort(indices, axis=1)
            if np.any((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)):
                raise ValueError("a reference appears twice in one row of indices")
        indices.setflags(write=False)
        distances.setflags(write=False)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "distances", distances)
        if self.labels is not None:
            labels = np.array(self.labels, copy=copy)
            if labels.shape != indices.shape:
                raise ValueError(
                    f"labels has shape {labels.shape} but indices has shape {indices.shape}"
                )
            labels.setflags(write=False)
            object.__setattr__(self, "labels", labels)

    @property
    def num_queries(self) -> int:
        """Number of queries (rows)."""
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        """Number of neighbours per query (columns)."""
        return int(self.indices.shape[1])

    def __len__(self) -> int:
        return self.num_queries

    def head(self, k: int) -> Neighbours:
        """Return a new value with only the first ``k`` neighbours of each query."""
        if not 0 <= k <= self.k:
            raise ValueError(f"k must be between 0 and {self.k}, got {k}")
        labels = None if self.labels is None else self.labels[:, :k]
        return Neighbours(self.indices[:, :k], self.distances[:, :k], labels, self.metric)

    def with_labels(self, reference_labels: np.ndarray) -> Neighbours:
        """Return a new value whose ``labels`` are ``reference_labels[indices]``."""
        reference_labels = np.asarray(reference_labels)
        labels = reference_labels[np.maximum(self.indices, 0)]
        return Neighbours(self.indices, self.distances, labels, self.metric)


def _as_float32_matrix(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must hold floating values, got dtype {x.dtype}")
        x = x.float().numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold numbers, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_vectors, dim), got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"{name} contains NaN or inf in {bad} of {len(x)} rows")
    return x


def _block_distances(
    queries: torch.Tensor, reference: torch.Tensor, ref_sq_norms: torch.Tensor, metric: str
) -> torch.Tensor:
    """(q, n) distances: squared L2 as |q|^2 + |r|^2 - 2<q, r> (like faiss), or -<q, r>."""
    if metric == "ip":
        return -(queries @ reference.T)
    q_sq = (queries * queries).sum(dim=1, keepdim=True)
    dist = torch.addmm(ref_sq_norms.unsqueeze(0), queries, reference.T, alpha=-2.0)
    return dist.add_(q_sq).clamp_min_(0.0)


def _order_rows(dist: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (distance, index), the tie rule; rows already in order are kept."""
    if dist.shape[1] < 2:
        return dist, idx
    later, earlier = dist[:, 1:], dist[:, :-1]
    out_of_order = (later < earlier) | ((later == earlier) & (idx[:, 1:] < idx[:, :-1]))
    rows = np.flatnonzero(out_of_order.any(axis=1))
    if len(rows):
        d, i = dist[rows], idx[rows]
        by_index = np.argsort(i, axis=1, kind="stable")
        d, i = np.take_along_axis(d, by_index, 1), np.take_along_axis(i, by_index, 1)
        by_distance = np.argsort(d, axis=1, kind="stable")
        dist, idx = dist.copy(), idx.copy()
        dist[rows] = np.take_along_axis(d, by_distance, 1)
        idx[rows] = np.take_along_axis(i, by_distance, 1)
    return dist, idx


def _torch_exact_topk(
    queries: np.ndarray,
    reference: torch.Tensor,
    ref_sq_norms: torch.Tensor,
    k: int,
    metric: str,
    chunk_size: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k under the tie rule, computed block by block in torch; k <= len(reference)."""
    num_ref = reference.shape[0]
    rows = chunk_size or max(1, _BLOCK_ENTRIES // max(num_ref, 1))
    fetch = min(k + 1, num_ref)
    out_dist = np.empty((len(queries), k), dtype=np.float32)
    out_idx = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), rows):
        stop = min(start + rows, len(queries))
        block = _block_distances(
            torch.from_numpy(queries[start:stop]), reference, ref_sq_norms, metric
        )
        values, positions = torch.topk(block, fetch, dim=1, largest=False, sorted=True)
        dist, idx = _order_rows(values.numpy(), positions.numpy())
        if fetch > k:
            # The k-th and (k+1)-th candidates tie: which references at that distance make the
            # cut is decided by index, over every reference at that distance in the row.
            for row in np.flatnonzero(dist[:, k - 1] == dist[:, k]):
                edge = dist[row, k - 1]
                kept = int(np.count_nonzero(dist[row, :k] < edge))
                tied = torch.nonzero(block[row] == float(edge)).flatten().numpy()
                idx[row, kept:k] = np.sort(tied)[: k - kept]
                dist[row, kept:k] = edge
        out_dist[start:stop] = dist[:, :k]
        out_idx[start:stop] = idx[:, :k]
    return out_dist, out_idx


def _drop_excluded(
    dist: np.ndarray, idx: np.ndarray, exclude: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 ranked candidates keep k: drop the excluded reference, else the last one."""
    is_excluded = idx == exclude[:, None]
    position = np.where(is_excluded.any(axis=1), is_excluded.argmax(axis=1), k)
    columns = np.arange(k)[None, :]
    columns = columns + (columns >= position[:, None])
    return np.take_along_axis(dist, columns, 1), np.take_along_axis(idx, columns, 1)


def exact_search(
    queries: Any,
    reference: Any,
    k: int,
    *,
    metric: str = "l2",
    exclude: Any = None,
    reference_labels: Any = None,
    chunk_size: int | None = None,
) -> Neighbours:
    """Exact k-NN in pure torch, chunked over queries so that memory stays bounded.

    Computes d(q, r) = |q|^2 + |r|^2 - 2<q, r> (squared L2) or d(q, r) = -<q, r> (inner
    product) for one block of queries at a time (at most 2**24 distances, 64 MiB), keeps the k
    smallest per row, and orders ties by reference index (see the module docstring). This is
    the fallback of `NeighbourIndex` when faiss is absent.

    Parameters:
        queries: (num_queries, dim) float array or tensor.
        reference: (num_reference, dim) float array or tensor.
        k: neighbours per query, 1 <= k <= num_reference (num_reference - 1 with ``exclude``).
        metric: "l2" (squared Euclidean) or "ip" (inner product, larger is closer).
        exclude: optional (num_queries,) reference positions to leave out of each query's list,
            e.g. ``np.arange(n)`` when the queries are the reference itself; -1 for none.
        reference_labels: optional (num_reference,) labels copied into the result.
        chunk_size: queries per block; default fits the 64 MiB block.

    Example:
        >>> x = np.array([[0.0], [1.0], [3.0]])
        >>> exact_search(x, x, k=1, exclude=np.arange(3)).indices.ravel().tolist()
        [1, 0, 1]
    """
    index = NeighbourIndex(metric=metric, backend="torch", chunk_size=chunk_size)
    index.add(reference, labels=reference_labels)
    return index.search(queries, k, exclude=exclude)


class NeighbourIndex:
    """A k-NN index: exact flat search by default, IVF or HNSW (faiss) as options.

    ``kind="flat"`` is exact (faiss ``IndexFlatL2``/``IndexFlatIP``, or the chunked torch
    search when faiss is absent or ``backend="torch"``), with ties ordered by reference index.
    ``kind="ivf"`` (inverted file, Jegou, Douze, Schmid 2011) and ``kind="hnsw"``
    (hierarchical navigable small world graphs, Malkov, Yashunin 2018) are approximate and
    need faiss. Results come back as `Neighbours`.

    Parameters:
        dim: embedding dimension; inferred from the first ``add`` when None.
        metric: "l2" (squared Euclidean distance) or "ip" (inner product; use unit vectors
            for cosine similarity).
        kind: "flat", "ivf" or "hnsw".
        backend: "auto" (faiss if installed), "faiss" or "torch" (flat only).
        nlist: IVF cells (trained by k-means on the first ``add``; needs >= nlist vectors).
        nprobe: IVF cells visited per query.
        hnsw_m: HNSW neighbours per node.
        ef_construction: HNSW candidate list size while building.
        ef_search: HNSW candidate list size while searching.
        chunk_size: queries per block for the torch search; default keeps blocks at 64 MiB.

    Example:
        >>> index = NeighbourIndex(metric="l2")
        >>> index.add(np.eye(3, dtype=np.float32), labels=np.array(["a", "b", "c"]))
        >>> index.search(np.array([[0.9, 0.1, 0.0]]), k=2).labels.tolist()
        [['a', 'b']]
    """

    def __init__(
        self,
        dim: int | None = None,
        metric: str = "l2",
        kind: str = "flat",
        *,
        backend: str = "auto",
        nlist: int = 100,
        nprobe: int = 8,
        hnsw_m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 64,
        chunk_size: int | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if dim is not None and dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        for name, value in (
            ("nlist", nlist),
            ("nprobe", nprobe),
            ("hnsw_m", hnsw_m),
            ("ef_construction", ef_construction),
            ("ef_search", ef_search),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        faiss = _load_faiss()
        if backend == "auto":
            backend = "faiss" if faiss is not None else "torch"
        if backend == "faiss" and faiss is None:
            raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu")
        if backend == "torch" and kind != "flat":
            raise ValueError(
                f"kind={kind!r} needs faiss (pip install faiss-cpu); the torch backend is exact "
                "flat search only, use kind='flat'"
            )
        self.dim = dim
        self.metric = metric
        self.kind = kind
        self.backend = backend
        self.nlist = nlist
        self.nprobe = nprobe
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.chunk_size = chunk_size
        self._faiss = faiss if backend == "faiss" else None
        self._faiss_index: Any = None
        self._vectors: list[np.ndarray] = []  # torch backend: added blocks
        self._torch_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._labels: list[np.ndarray] | None = []
        self._ntotal = 0

    @property
    def exact(self) -> bool:
        """True for flat (exact) search."""
        return self.kind == "flat"

    @property
    def ntotal(self) -> int:
        """Number of stored reference vectors."""
        return self._ntotal

    def __len__(self) -> int:
        return self._ntotal

    def __repr__(self) -> str:
        return (
            f"NeighbourIndex(dim={self.dim}, metric={self.metric!r}, kind={self.kind!r}, "
            f"backend={self.backend!r}, ntotal={self._ntotal})"
        )

    def _new_faiss_index(self) -> Any:
        faiss = self._faiss
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            return faiss.IndexFlat(self.dim, metric)
        if self.kind == "ivf":
            index = faiss.index_factory(self.dim, f"IVF{self.nlist},Flat", metric)
            index.nprobe = self.nprobe
            return index
        index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, metric)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        return index

    def add(self, embeddings: Any, labels: Any = None) -> None:
        """Append reference vectors (and their labels) to the index.

        Parameters:
            embeddings: (num_vectors, dim) float array or tensor.
            labels: optional (num_vectors,) labels of any dtype (integers, strings). Give
                labels on every ``add`` or on none.

        Example:
            >>> index = NeighbourIndex()
            >>> index.add(np.zeros((4, 2)), labels=np.arange(4))
            >>> len(index)
            4
        """
        vectors = _as_float32_matrix(embeddings, "embeddings")
        if self.dim is None:
            self.dim = vectors.shape[1]
        if vectors.shape[1] != self.dim:
            raise ValueError(
                f"embeddings have dim {vectors.shape[1]} but the index has dim {self.dim}"
            )
        if labels is not None:
            if isinstance(labels, torch.Tensor):
                labels = labels.detach().cpu().numpy()
            labels = np.asarray(labels)
            if labels.shape != (len(vectors),):
                raise ValueError(
                    f"labels has shape {labels.shape} but embeddings has "
                    f"{len(vectors)} rows; pass one label per row"
                )
        if self._ntotal and (labels is None) != (self._labels is None):
            raise ValueError("give labels on every add() or on none")
        if self._ntotal == 0:
            self._labels = None if labels is None else []
        if self.backend == "faiss":
            if self._faiss_index is None:
                self._faiss_index = self._new_faiss_index()
            if not self._faiss_index.is_trained:
                if len(vectors) < self.nlist:
                    raise ValueError(
                        f"kind='ivf' trains {self.nlist} cells on the first add, "
                        f"which has only {len(vectors)} vectors; add more vectors "
                        "at once or lower nlist"
                    )
                self._faiss_index.train(vectors)
            self._faiss_index.add(vectors)
        else:
            self._vectors.append(vectors)
        self._torch_cache = None  # may view faiss memory that add() reallocates
        if labels is not None:
            self._labels.append(labels)
        self._ntotal += len(vectors)

    def _reference_labels(self) -> np.ndarray | None:
        if self._labels is None:
            return None
        if len(self._labels) > 1:
            self._labels = [np.concatenate(self._labels)]
        return self._labels[0]

    def vectors(self) -> np.ndarray:
        """All stored reference vectors, (ntotal, dim) float32 (flat kinds without a copy)."""
        if self.backend == "torch":
            if len(self._vectors) > 1:
                self._vectors = [np.concatenate(self._vectors)]
            return self._vectors[0] if self._vectors else np.empty((0, self.dim or 0), "float32")
        if self.kind == "flat":
            pointer = self._faiss_index.get_xb()
            return self._faiss.rev_swig_ptr(pointer, self._ntotal * self.dim).reshape(
                self._ntotal, self.dim
            )
        return self._faiss_index.reconstruct_n(0, self._ntotal)

    def _torch_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._torch_cache is None:
            reference = torch.from_numpy(self.vectors())
            self._torch_cache = (reference, (reference * reference).sum(dim=1))
        return self._torch_cache

    def search(self, queries: Any, k: int, *, exclude: Any = None) -> Neighbours:
        """Return the k nearest references of each query as `Neighbours`.

        With ``exclude``, the index searches k + 1 candidates and drops the excluded reference
        by position (not by distance 0, since duplicates exist); when it is not among the
        candidates (ties at distance 0 with lower-index duplicates), the last candidate is
        dropped instead, which is exactly the ranking without it.

        Parameters:
            queries: (num_queries, dim) float array or tensor.
            k: neighbours per query, 1 <= k <= ntotal (ntotal - 1 with ``exclude``).
            exclude: optional (num_queries,) integer reference positions to leave out, one per
                query (-1 for none); ``np.arange(n)`` when searching the indexed set itself.

        Example:
            >>> index = NeighbourIndex()
            >>> index.add(np.array([[0.0], [1.0], [3.0]]))
            >>> index.search(np.array([[0.0], [1.0], [3.0]]), 1, exclude=np.arange(3)).indices
            array([[1],
                   [0],
                   [1]])
        """
        queries = _as_float32_matrix(queries, "queries")
        if self._ntotal == 0:
            raise ValueError("the index is empty; call add() before search()")
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"queries have dim {queries.shape[1]} but the index has dim {self.dim}"
            )
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {k!r}")
        k = int(k)
        available = self._ntotal - (exclude is not None)
        if not 1 <= k <= available:
            note = " after excluding one reference per query" if exclude is not None else ""
            raise ValueError(
                f"k={k} but the index holds {available} candidates per query{note}; "
                f"pass k between 1 and {available}"
            )
        if exclude is not None:
            if isinstance(exclude, torch.Tensor):
                exclude = exclude.detach().cpu().numpy()
            exclude = np.asarray(exclude)
            if exclude.shape != (len(queries),) or exclude.dtype.kind not in "iu":
                raise ValueError(
                    f"exclude must be ({len(queries)},) integers, one reference "
                    f"position per query, got shape {exclude.shape} and dtype "
                    f"{exclude.dtype}"
                )
            exclude = exclude.astype(np.int64)
        wanted = k + (exclude is not None)
        dist, idx = self._ranked(queries, wanted)
        if exclude is not None:
            dist, idx = _drop_excluded(dist, idx, exclude, k)
        labels = self._reference_labels()
        neighbour_labels = None if labels is None else labels[np.maximum(idx, 0)]
        return Neighbours._adopt(
            np.ascontiguousarray(idx), np.ascontiguousarray(dist), neighbour_labels, self.metric
        )

    def _ranked(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best candidates per query as (distances, indices), ordered by the tie rule."""
        if self.backend == "torch":
            reference, sq_norms = self._torch_reference()
            return _torch_exact_topk(queries, reference, sq_norms, k, self.metric, self.chunk_size)
        fetch = min(k + 1, self._ntotal) if self.exact else k
        raw_dist, idx = self._faiss_index.search(queries, fetch)
        idx = idx.astype(np.int64, copy=False)
        dist = raw_dist if self.metric == "l2" else -raw_dist
        dist[idx < 0] = np.inf
        dist, idx = _order_rows(dist, idx)
        if self.exact and fetch > k:
            # faiss does not order ties by index, so a row whose k-th and (k+1)-th candidates
            # tie is recomputed exactly (rare with real embeddings).
            tied = np.flatnonzero(dist[:, k - 1] == dist[:, k])
            if len(tied):
                reference, sq_norms = self._torch_reference()
                dist[tied, :k], idx[tied, :k] = _torch_exact_topk(
                    queries[tied], reference, sq_norms, k, self.metric, self.chunk_size
                )
        return dist[:, :k], idx[:, :k]

    def save(self, path: str | Path) -> None:
        """Write the index, its labels and its settings to one ``.npz`` file.

        Flat indexes are stored as their vectors (loadable with or without faiss); IVF and
        HNSW as serialised faiss indexes. Labels must be numbers, booleans or strings.

        Example:
            >>> import tempfile, os
            >>> index = NeighbourIndex(); index.add(np.eye(2))
            >>> path = os.path.join(tempfile.mkdtemp(), "index.npz")
            >>> index.save(path); len(NeighbourIndex.load(path))
            2
        """
        config = {
            "format_version": _FORMAT_VERSION,
            "dim": self.dim,
            "metric": self.metric,
            "kind": self.kind,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "chunk_size": self.chunk_size,
        }
        arrays: dict[str, np.ndarray] = {"config": np.array(json.dumps(config))}
        if self.kind == "flat":
            arrays["vectors"] = (
                np.ascontiguousarray(self.vectors())
                if self._ntotal
                else np.empty((0, self.dim or 0), np.float32)
            )
        elif self._faiss_index is not None:
            arrays["faiss_index"] = self._faiss.serialize_index(self._faiss_index)
        labels = self._reference_labels()
        if labels is not None:
            if labels.dtype.kind not in "biuUS":
                raise ValueError(
                    f"cannot save labels of dtype {labels.dtype}; save integer or "
                    "string labels (e.g. labels.astype(str))"
                )
            arrays["labels"] = labels
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "auto") -> NeighbourIndex:
        """Read an index written by `save`.

        Parameters:
            path: the ``.npz`` file.
            backend: "auto", "faiss" or "torch" (flat indexes can change backend).

        Example:
            >>> index = NeighbourIndex.load("index.npz")  # doctest: +SKIP
        """
        with np.load(path, allow_pickle=False) as data:
            config = json.loads(str(data["config"]))
            if config.pop("format_version") != _FORMAT_VERSION:
                raise ValueError(f"{path} was written by an incompatible version of deepmetric")
            dim = config.pop("dim")
            index = cls(dim, backend=backend, **config)
            labels = data["labels"] if "labels" in data else None
            if "vectors" in data:
                if len(data["vectors"]):
                    index.add(data["vectors"], labels=labels)
            elif "faiss_index" in data:
                if index.backend != "faiss":
                    raise ImportError(
                        f"{path} holds a kind={index.kind!r} faiss index; install "
                        "faiss-cpu to load it"
                    )
                index._faiss_index = index._faiss.deserialize_index(data["faiss_index"])
                if index.kind == "ivf":
                    index._faiss_index.nprobe = index.nprobe
                else:
                    index._faiss_index.hnsw.efSearch = index.ef_search
                index._ntotal = int(index._faiss_index.ntotal)
                index._labels = None if labels is None else [labels]
        return index
