"""Nearest-neighbour search: `NeighbourIndex`, a small k-NN index over faiss or torch.

`NeighbourIndex` stores reference embeddings (and optionally their labels) and answers k-NN
queries. The default is exact flat search; IVF and HNSW are approximate options. When faiss
is not installed, exact search runs in pure torch, chunked over queries so that memory stays
bounded. Every search returns a `Neighbours` value (`deepmetric.neighbours`, with the tie rule:
distance, then reference index) that the metrics in `deepmetric.metrics` take.

The parts live in three modules: `deepmetric.neighbours` (the result value),
`deepmetric.index_backends` (the torch and faiss engines) and `deepmetric.index_file` (the
``.npz`` file, read safely: any damage raises `IndexFileError`). This module holds the index
itself, the exclusion of one reference per query and `exact_search`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmetric.index_backends import FaissBackend, TorchFlatBackend
from deepmetric.index_file import IndexFileError, read_index_file, write_index_file
from deepmetric.neighbours import METRICS, Neighbours

__all__ = [
    "METRICS",
    "KINDS",
    "IndexFileError",
    "Neighbours",
    "NeighbourIndex",
    "exact_search",
]

KINDS = ("flat", "ivf", "hnsw")
BACKENDS = ("auto", "faiss", "torch")


def _load_faiss() -> Any:
    """Return the faiss module, or None when it is not installed (tests monkeypatch this)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def as_float32_rows(x: Any, name: str, *, min_rows: int = 0) -> np.ndarray:
    """``x`` as a finite, C-contiguous (N, D) float32 array, N >= min_rows and D >= 1.

    The one check of embedding inputs for the index and the metrics; errors name ``name``.

    Example:
        >>> as_float32_rows([[1, 2]], "queries").dtype
        dtype('float32')
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
        x = x.float().numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold numbers, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (num_rows, dim), got shape {x.shape}; "
            "reshape it, e.g. x.reshape(len(x), -1)"
        )
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no columns (shape {x.shape}); pass dim >= 1 values per row")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} is empty (shape {x.shape}); pass at least {min_rows} row(s)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(
            f"{name} contains NaN or inf in {bad} of {len(x)} rows (float32); "
            "check the model output or the embedding scale"
        )
    return x


def _check_count(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


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
    smallest per row, and orders ties by reference index (see `deepmetric.neighbours`). This
    is the fallback of `NeighbourIndex` when faiss is absent.

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
        _check_count("dim", dim, allow_none=True)
        for name, value in (
            ("nlist", nlist),
            ("nprobe", nprobe),
            ("hnsw_m", hnsw_m),
            ("ef_construction", ef_construction),
            ("ef_search", ef_search),
        ):
            _check_count(name, value)
        _check_count("chunk_size", chunk_size, allow_none=True)
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
        self._engine: TorchFlatBackend | FaissBackend | None = None
        self._labels: list[np.ndarray] | None = []

    @property
    def exact(self) -> bool:
        """True for flat (exact) search."""
        return self.kind == "flat"

    @property
    def ntotal(self) -> int:
        """Number of stored reference vectors."""
        return 0 if self._engine is None else self._engine.ntotal

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return (
            f"NeighbourIndex(dim={self.dim}, metric={self.metric!r}, kind={self.kind!r}, "
            f"backend={self.backend!r}, ntotal={self.ntotal})"
        )

    def _settings(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "kind": self.kind,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "chunk_size": self.chunk_size,
        }

    def _new_engine(self) -> TorchFlatBackend | FaissBackend:
        if self.backend == "torch":
            return TorchFlatBackend(self.dim, self.metric, self.chunk_size)
        return FaissBackend(self._faiss, self.dim, self.metric, self.kind, self._settings())

    def add(self, embeddings: Any, labels: Any = None) -> None:
        """Append reference vectors (and their labels) to the index.

        Parameters:
            embeddings: (num_vectors, dim) float array or tensor.
            labels: optional (num_vectors,) labels of any dtype (integers, strings), or
                (num_vectors, num_labels) multi-hot rows. Give labels on every ``add`` or on
                none.

        Example:
            >>> index = NeighbourIndex()
            >>> index.add(np.zeros((4, 2)), labels=np.arange(4))
            >>> len(index)
            4
        """
        vectors = as_float32_rows(embeddings, "embeddings")
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
            if labels.ndim not in (1, 2) or len(labels) != len(vectors):
                raise ValueError(
                    f"labels has shape {labels.shape} but embeddings has "
                    f"{len(vectors)} rows; pass one label per row"
                )
        if self.ntotal and (labels is None) != (self._labels is None):
            raise ValueError("give labels on every add() or on none")
        if self.ntotal == 0:
            self._labels = None if labels is None else []
        if self._engine is None:
            self._engine = self._new_engine()
        self._engine.add(vectors)
        if labels is not None:
            self._labels.append(labels)

    def _reference_labels(self) -> np.ndarray | None:
        if self._labels is None:
            return None
        if len(self._labels) > 1:
            self._labels = [np.concatenate(self._labels)]
        return self._labels[0] if self._labels else None

    def vectors(self) -> np.ndarray:
        """All stored reference vectors, (ntotal, dim) float32 (flat kinds without a copy)."""
        if self._engine is None:
            return np.empty((0, self.dim or 0), np.float32)
        return self._engine.vectors()

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
        queries = as_float32_rows(queries, "queries")
        if self.ntotal == 0:
            raise ValueError("the index is empty; call add() before search()")
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"queries have dim {queries.shape[1]} but the index has dim {self.dim}"
            )
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {k!r}")
        k = int(k)
        available = self.ntotal - (exclude is not None)
        if not 1 <= k <= available:
            note = " after excluding one reference per query" if exclude is not None else ""
            raise ValueError(
                f"k={k} but the index holds {available} candidates per query{note}; "
                f"pass k between 1 and {available}"
            )
        if exclude is not None:
            exclude = self._checked_exclude(exclude, len(queries))
        dist, idx = self._engine.ranked(queries, k + (exclude is not None))
        if exclude is not None:
            dist, idx = _drop_excluded(dist, idx, exclude, k)
        labels = self._reference_labels()
        neighbour_labels = None if labels is None else labels[np.maximum(idx, 0)]
        return Neighbours._adopt(
            np.ascontiguousarray(idx), np.ascontiguousarray(dist), neighbour_labels, self.metric
        )

    def _checked_exclude(self, exclude: Any, num_queries: int) -> np.ndarray:
        if isinstance(exclude, torch.Tensor):
            exclude = exclude.detach().cpu().numpy()
        exclude = np.asarray(exclude)
        if exclude.shape != (num_queries,) or exclude.dtype.kind not in "iu":
            raise ValueError(
                f"exclude must be ({num_queries},) integers, one reference position per query, "
                f"got shape {exclude.shape} and dtype {exclude.dtype}"
            )
        exclude = exclude.astype(np.int64)
        if len(exclude) and (exclude.min() < -1 or exclude.max() >= self.ntotal):
            raise ValueError(
                f"exclude holds positions outside [-1, {self.ntotal - 1}]; give each query the "
                "position of a stored reference, or -1 for none"
            )
        return exclude

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
        vectors = faiss_index = None
        if self.kind == "flat":
            vectors = np.ascontiguousarray(self.vectors())
        elif self._engine is not None:
            faiss_index = self._engine.serialize()
        write_index_file(
            path,
            self.dim,
            self._settings(),
            vectors=vectors,
            faiss_index=faiss_index,
            labels=self._reference_labels(),
        )

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "auto") -> NeighbourIndex:
        """Read an index written by `save`.

        The file is read without unpickling and checked; a missing or damaged file raises
        `IndexFileError` (a ValueError) naming the file and how to rebuild it.

        Parameters:
            path: the ``.npz`` file.
            backend: "auto", "faiss" or "torch" (flat indexes can change backend).

        Example:
            >>> NeighbourIndex.load("missing.npz")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            deepmetric.index_file.IndexFileError: cannot load the index missing.npz: ...
        """
        content = read_index_file(path)
        try:
            index = cls(content.dim, backend=backend, **content.settings)
        except ValueError as error:
            raise IndexFileError(path, f"'config' has a bad setting ({error})") from None
        if content.vectors is not None and len(content.vectors):
            index.add(content.vectors, labels=content.labels)
        elif content.faiss_index is not None:
            index._restore_faiss(content.faiss_index, content.labels, path)
        return index

    def _restore_faiss(self, blob: np.ndarray, labels: np.ndarray | None, path: Any) -> None:
        if self.backend != "faiss":
            raise ImportError(
                f"{path} holds a kind={self.kind!r} faiss index; install faiss-cpu to load it"
            )
        engine = self._new_engine()
        try:
            engine.restore(blob)
        except RuntimeError:
            raise IndexFileError(path, "'faiss_index' does not decode as a faiss index") from None
        if engine.index.d != self.dim:
            raise IndexFileError(
                path, f"'faiss_index' has dim {engine.index.d} but 'config' says dim={self.dim}"
            )
        metric = self._faiss.METRIC_L2 if self.metric == "l2" else self._faiss.METRIC_INNER_PRODUCT
        if engine.index.metric_type != metric:
            raise IndexFileError(path, f"'faiss_index' does not use metric={self.metric!r}")
        if labels is not None and len(labels) != engine.ntotal:
            raise IndexFileError(
                path,
                f"it has {len(labels)} labels for {engine.ntotal} vectors; one label per vector",
            )
        self._engine = engine
        self._labels = None if labels is None else [labels]
