"""The two search engines behind `deepmetric.index.NeighbourIndex`: chunked torch and faiss.

Both store float32 reference vectors and answer "the k best candidates of each query, ordered
by the tie rule of `deepmetric.neighbours`" as (distances, indices) arrays, distances being
squared L2 or -<q, r>, so smaller is closer. `TorchFlatBackend` is exact flat search in pure
torch, one block of at most 2**24 distances (64 MiB) at a time. `FaissBackend` wraps a faiss
flat, IVF or HNSW index; its exact (flat) results are made to follow the tie rule by
recomputing, with the torch search, the rare rows whose k-th and (k+1)-th candidates tie.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["FaissBackend", "TorchFlatBackend", "block_distances", "order_rows", "torch_top_k"]

# Upper bound on the number of float32 entries of one (queries x references) distance block in
# the torch search (2**24 entries = 64 MiB).
BLOCK_ENTRIES = 1 << 24


def block_distances(
    queries: torch.Tensor, reference: torch.Tensor, ref_sq_norms: torch.Tensor, metric: str
) -> torch.Tensor:
    """(q, n) distances: squared L2 as |q|^2 + |r|^2 - 2<q, r> (like faiss), or -<q, r>.

    Example:
        >>> r = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> block_distances(r[1:], r, (r * r).sum(dim=1), "l2").tolist()
        [[25.0, 0.0]]
    """
    if metric == "ip":
        return -(queries @ reference.T)
    q_sq = (queries * queries).sum(dim=1, keepdim=True)
    dist = torch.addmm(ref_sq_norms.unsqueeze(0), queries, reference.T, alpha=-2.0)
    return dist.add_(q_sq).clamp_min_(0.0)


def order_rows(dist: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (distance, index), the tie rule; rows already in order are kept.

    Example:
        >>> d, i = order_rows(np.array([[1.0, 1.0, 0.5]]), np.array([[7, 2, 9]]))
        >>> i.tolist()
        [[9, 2, 7]]
    """
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


def torch_top_k(
    queries: np.ndarray,
    reference: torch.Tensor,
    ref_sq_norms: torch.Tensor,
    k: int,
    metric: str,
    chunk_size: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k under the tie rule, computed block by block in torch; k <= len(reference).

    Example:
        >>> r = torch.tensor([[0.0], [1.0], [1.0]])
        >>> torch_top_k(np.array([[0.9]], np.float32), r, (r * r).sum(1), 2, "l2", None)[1]
        array([[1, 2]])
    """
    num_ref = reference.shape[0]
    rows = chunk_size or max(1, BLOCK_ENTRIES // max(num_ref, 1))
    fetch = min(k + 1, num_ref)
    out_dist = np.empty((len(queries), k), dtype=np.float32)
    out_idx = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), rows):
        stop = min(start + rows, len(queries))
        block = block_distances(
            torch.from_numpy(queries[start:stop]), reference, ref_sq_norms, metric
        )
        values, positions = torch.topk(block, fetch, dim=1, largest=False, sorted=True)
        dist, idx = order_rows(values.numpy(), positions.numpy())
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


class TorchFlatBackend:
    """Exact flat search in pure torch over the added float32 vectors."""

    exact = True

    def __init__(self, dim: int, metric: str, chunk_size: int | None) -> None:
        self.dim, self.metric, self.chunk_size = dim, metric, chunk_size
        self._blocks: list[np.ndarray] = []
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return sum(len(block) for block in self._blocks)

    def add(self, vectors: np.ndarray) -> None:
        """Append (n, dim) float32 vectors."""
        self._blocks.append(vectors)
        self._cache = None

    def vectors(self) -> np.ndarray:
        """All stored vectors, (ntotal, dim) float32."""
        if len(self._blocks) > 1:
            self._blocks = [np.concatenate(self._blocks)]
        return self._blocks[0] if self._blocks else np.empty((0, self.dim), np.float32)

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors as a tensor and their squared norms (cached until the next add)."""
        if self._cache is None:
            reference = torch.from_numpy(self.vectors())
            self._cache = (reference, (reference * reference).sum(dim=1))
        return self._cache

    def ranked(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best candidates per query as (distances, indices), by the tie rule."""
        reference, sq_norms = self.reference()
        return torch_top_k(queries, reference, sq_norms, k, self.metric, self.chunk_size)


class FaissBackend:
    """A faiss index: flat (exact, ties fixed by the torch search), IVF or HNSW."""

    def __init__(
        self, faiss: Any, dim: int, metric: str, kind: str, settings: dict[str, Any]
    ) -> None:
        self.faiss, self.dim, self.metric, self.kind = faiss, dim, metric, kind
        self.exact = kind == "flat"
        self.settings = settings
        self.index = self._new_index()
        self._tie_search = TorchFlatBackend(dim, metric, settings.get("chunk_size"))

    def _new_index(self) -> Any:
        faiss, settings = self.faiss, self.settings
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            return faiss.IndexFlat(self.dim, metric)
        if self.kind == "ivf":
            index = faiss.index_factory(self.dim, f"IVF{settings['nlist']},Flat", metric)
            index.nprobe = settings["nprobe"]
            return index
        index = faiss.IndexHNSWFlat(self.dim, settings["hnsw_m"], metric)
        index.hnsw.efConstruction = settings["ef_construction"]
        index.hnsw.efSearch = settings["ef_search"]
        return index

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        """Append (n, dim) float32 vectors; an IVF index trains its cells on the first add."""
        if not self.index.is_trained:
            nlist = self.settings["nlist"]
            if len(vectors) < nlist:
                raise ValueError(
                    f"kind='ivf' trains {nlist} cells on the first add, which has only "
                    f"{len(vectors)} vectors; add more vectors at once or lower nlist"
                )
            self.index.train(vectors)
        self.index.add(vectors)
        self._tie_search = TorchFlatBackend(self.dim, self.metric, self.settings.get("chunk_size"))

    def vectors(self) -> np.ndarray:
        """All stored vectors, (ntotal, dim) float32 (a view for flat indexes)."""
        if self.exact:
            pointer = self.index.get_xb()
            return self.faiss.rev_swig_ptr(pointer, self.ntotal * self.dim).reshape(
                self.ntotal, self.dim
            )
        return self.index.reconstruct_n(0, self.ntotal)

    def serialize(self) -> np.ndarray:
        """The faiss index as a 1-D uint8 array (for IVF and HNSW files)."""
        return self.faiss.serialize_index(self.index)

    def restore(self, serialized: np.ndarray) -> None:
        """Replace the index by a serialised one and apply this backend's search settings."""
        self.index = self.faiss.deserialize_index(serialized)
        if self.kind == "ivf":
            self.index.nprobe = self.settings["nprobe"]
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = self.settings["ef_search"]

    def ranked(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best candidates per query as (distances, indices), by the tie rule."""
        fetch = min(k + 1, self.ntotal) if self.exact else k
        raw_dist, idx = self.index.search(queries, fetch)
        idx = idx.astype(np.int64, copy=False)
        dist = raw_dist if self.metric == "l2" else -raw_dist
        dist[idx < 0] = np.inf
        dist, idx = order_rows(dist, idx)
        if self.exact and fetch > k:
            # faiss does not order ties by index, so a row whose k-th and (k+1)-th candidates
            # tie is recomputed exactly (rare with real embeddings).
            tied = np.flatnonzero(dist[:, k - 1] == dist[:, k])
            if len(tied):
                if self._tie_search.ntotal == 0:
                    self._tie_search.add(self.vectors())
                dist[tied, :k], idx[tied, :k] = self._tie_search.ranked(queries[tied], k)
        return dist[:, :k], idx[:, :k]
