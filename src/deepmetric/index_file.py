"""Reading and writing the ``.npz`` file of a `deepmetric.index.NeighbourIndex`.

The file holds a JSON ``config`` (format version, dimension, metric, kind and search
settings), then either ``vectors`` (flat indexes: the float32 reference vectors, loadable with
or without faiss) or ``faiss_index`` (IVF and HNSW: the serialised faiss index as bytes), and
optionally ``labels``. Files are read with ``allow_pickle=False`` and checked key by key: any
damage (a truncated file, not a zip archive, a missing key, a wrong shape or dtype, a pickled
object array, a faiss blob that does not decode) raises one error type, `IndexFileError`, whose
message names the file, says what is wrong and how to rebuild it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepmetric._validation import FILE_READ_ERRORS

__all__ = ["FORMAT_VERSION", "IndexFile", "IndexFileError", "read_index_file", "write_index_file"]

FORMAT_VERSION = 1
SETTINGS = ("metric", "kind", "nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search")
OPTIONAL_SETTINGS = ("chunk_size",)
_REBUILD = "rebuild it with `deepmetric index RUN DATA` (or NeighbourIndex.save)"


class IndexFileError(ValueError):
    """An index file that cannot be read: missing, damaged or not written by deepmetric.

    The message names the file, says what is wrong and how to rebuild the index.

    Example:
        >>> str(IndexFileError("runs/x/index.npz", "it is not a zip archive"))[:40]
        'cannot load the index runs/x/index.npz: '
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"cannot load the index {path}: {problem}; {_REBUILD}")


@dataclass(frozen=True)
class IndexFile:
    """The checked content of an index file."""

    dim: int | None
    settings: dict[str, Any]
    vectors: np.ndarray | None
    faiss_index: np.ndarray | None
    labels: np.ndarray | None

    @property
    def ntotal(self) -> int | None:
        """Number of stored vectors when known without faiss (flat files), else None."""
        return None if self.vectors is None else len(self.vectors)


def write_index_file(
    path: str | Path,
    dim: int | None,
    settings: dict[str, Any],
    *,
    vectors: np.ndarray | None = None,
    faiss_index: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> None:
    """Write one index file (see the module docstring); labels must be numbers or strings.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "index.npz")
        >>> settings = dict(metric="l2", kind="flat", nlist=1, nprobe=1, hnsw_m=1,
        ...                 ef_construction=1, ef_search=1)
        >>> write_index_file(path, 2, settings, vectors=np.eye(2, dtype=np.float32))
        >>> read_index_file(path).vectors.shape
        (2, 2)
    """
    config = {"format_version": FORMAT_VERSION, "dim": dim, **settings}
    arrays: dict[str, np.ndarray] = {"config": np.array(json.dumps(config))}
    if vectors is not None:
        arrays["vectors"] = vectors
    if faiss_index is not None:
        arrays["faiss_index"] = faiss_index
    if labels is not None:
        if labels.dtype.kind not in "biuUS":
            raise ValueError(
                f"cannot save labels of dtype {labels.dtype}; save integer or "
                "string labels (e.g. labels.astype(str))"
            )
        arrays["labels"] = labels
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _member(data: Any, key: str, path: str | Path) -> np.ndarray:
    try:
        return data[key]
    except FILE_READ_ERRORS as error:
        if "pickle" in str(error) or "Object arrays" in str(error):
            raise IndexFileError(path, f"{key!r} holds Python objects, not plain arrays") from None
        raise IndexFileError(path, f"{key!r} cannot be read ({type(error).__name__})") from None


def _config(raw: np.ndarray, path: str | Path) -> tuple[int | None, dict[str, Any]]:
    if raw.shape != () or raw.dtype.kind != "U":
        raise IndexFileError(path, f"'config' must be one string, got {raw.dtype} {raw.shape}")
    try:
        config = json.loads(str(raw))
    except json.JSONDecodeError:
        raise IndexFileError(path, "'config' is not valid JSON") from None
    if not isinstance(config, dict):
        raise IndexFileError(path, "'config' is not a JSON object")
    version = config.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise IndexFileError(
            path,
            f"it has format version {version!r}, this deepmetric reads {FORMAT_VERSION}",
        )
    missing = [key for key in ("dim", *SETTINGS) if key not in config]
    if missing:
        raise IndexFileError(path, f"'config' lacks {', '.join(missing)}")
    unknown = sorted(set(config) - {"dim", *SETTINGS, *OPTIONAL_SETTINGS})
    if unknown:
        raise IndexFileError(path, f"'config' has unknown settings {', '.join(unknown)}")
    dim = config.pop("dim")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise IndexFileError(path, f"'config' has dim={dim!r}, not a positive integer")
    return dim, config


def _checked_vectors(vectors: np.ndarray, dim: int | None, path: str | Path) -> np.ndarray:
    if vectors.dtype != np.float32 or vectors.ndim != 2:
        raise IndexFileError(
            path, f"'vectors' must be 2-D float32, got {vectors.dtype} of shape {vectors.shape}"
        )
    if len(vectors) and vectors.shape[1] != dim:
        raise IndexFileError(
            path, f"'vectors' has {vectors.shape[1]} columns but 'config' says dim={dim}"
        )
    if not np.isfinite(vectors).all():
        raise IndexFileError(path, "'vectors' contains NaN or inf")
    return vectors


def _checked_labels(labels: np.ndarray, path: str | Path) -> np.ndarray:
    if labels.ndim not in (1, 2) or labels.dtype.kind not in "biuUS":
        raise IndexFileError(
            path,
            f"'labels' must be 1-D numbers or strings (or 2-D multi-hot rows), got "
            f"{labels.dtype} of shape {labels.shape}",
        )
    return labels


def read_index_file(path: str | Path) -> IndexFile:
    """Read and check an index file; raise `IndexFileError` on any damage.

    Parameters:
        path: the ``.npz`` file written by `write_index_file`.

    Example:
        >>> read_index_file("no/such/index.npz")
        Traceback (most recent call last):
        ...
        deepmetric.index_file.IndexFileError: cannot load the index no/such/index.npz: there is \
no such file; rebuild it with `deepmetric index RUN DATA` (or NeighbourIndex.save)
    """
    if not Path(path).is_file():
        raise IndexFileError(path, "there is no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except FILE_READ_ERRORS:
        raise IndexFileError(path, "it is not a complete .npz archive (truncated?)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise IndexFileError(path, "it holds a single array, not an index archive")
    with archive as data:
        if "config" not in data.files:
            raise IndexFileError(path, "it has no 'config' entry")
        dim, settings = _config(_member(data, "config", path), path)
        vectors = faiss_index = labels = None
        if settings["kind"] == "flat":
            if "vectors" not in data.files:
                raise IndexFileError(path, "a flat index file needs a 'vectors' entry")
            vectors = _checked_vectors(_member(data, "vectors", path), dim, path)
        elif "faiss_index" in data.files:
            faiss_index = _member(data, "faiss_index", path)
            if faiss_index.dtype != np.uint8 or faiss_index.ndim != 1:
                raise IndexFileError(path, "'faiss_index' must be 1-D bytes (uint8)")
        if "labels" in data.files:
            labels = _checked_labels(_member(data, "labels", path), path)
    if vectors is not None and labels is not None and len(labels) != len(vectors):
        raise IndexFileError(
            path, f"it has {len(labels)} labels for {len(vectors)} vectors; one label per vector"
        )
    return IndexFile(dim, settings, vectors, faiss_index, labels)
