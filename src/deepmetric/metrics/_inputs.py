"""Input checks for the metrics, done once at each public entry; inner code trusts its inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deepmetric.index import as_float32_rows

AVERAGES = ("micro", "macro")


def as_embeddings(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a finite, C-contiguous (N, D) float32 array, N >= 1; raise else."""
    return as_float32_rows(x, name, min_rows=1)


def as_labels(labels: Any, num_rows: int, name: str, rows_name: str) -> np.ndarray:
    """Return ``labels`` as a 1-D NumPy array of integers, booleans, strings or objects.

    Labels are compared by equality and never cast to float; floating labels are refused.
    """
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(
                f"{name} has dtype {labels.dtype}; labels must be integers or strings "
                "(use labels.long() if they are whole numbers)"
            )
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per row), got shape {labels.shape}")
    if labels.dtype.kind not in "biuUSO":
        raise TypeError(
            f"{name} has dtype {labels.dtype}; labels must be integers or strings "
            "(use labels.astype(int) if they are whole numbers)"
        )
    if len(labels) != num_rows:
        raise ValueError(f"{name} has {len(labels)} entries but {rows_name} has {num_rows} rows")
    return labels


def _common_integer_arrays(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Bring integer/boolean label arrays to one exact integer dtype (object if needed)."""
    if all(a.dtype == arrays[0].dtype for a in arrays):
        return arrays
    if any(a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max for a in arrays):
        if all(a.dtype.kind in "ub" or (a.size == 0 or a.min() >= 0) for a in arrays):
            return [a.astype(np.uint64) for a in arrays]
        return [a.astype(object) for a in arrays]
    return [a.astype(np.int64) for a in arrays]


def encode_labels(*label_arrays: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Map labels to dense int64 codes by equality, jointly over all arrays.

    Returns (classes, codes): ``classes[codes[j]] == label_arrays[j]`` entry by entry.
    Integers of any width (and Python ints beyond 64 bits) compare exactly; strings compare as
    strings; mixing strings with numbers is refused rather than converted.
    """
    arrays = [np.asarray(a) for a in label_arrays]
    kinds = {a.dtype.kind for a in arrays}
    if kinds <= set("biu"):
        arrays = _common_integer_arrays(arrays)
    elif kinds == {"U", "S"}:
        raise TypeError("labels mix bytes and str; decode the bytes first")
    elif kinds & set("US") and kinds & set("biu"):
        raise TypeError("query and reference labels mix strings and numbers; use one kind")
    elif "O" in kinds:
        arrays = [a.astype(object) for a in arrays]
    try:
        classes, inverse = np.unique(np.concatenate(arrays), return_inverse=True)
    except TypeError as error:
        raise TypeError(
            f"labels must be mutually comparable (all integers or all strings): {error}"
        ) from error
    inverse = inverse.reshape(-1).astype(np.int64)
    codes, start = [], 0
    for a in arrays:
        codes.append(inverse[start : start + len(a)])
        start += len(a)
    return classes, codes


def check_average(average: str) -> str:
    """Return ``average`` if it is "micro" or "macro"; raise otherwise."""
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    return average


def check_ks(k: Any, name: str = "k") -> tuple[int, ...]:
    """Return ``k`` (an int or a sequence of ints >= 1) as a sorted tuple without repeats."""
    if isinstance(k, (int, np.integer)):
        values = [k]
    else:
        try:
            values = list(k)
        except TypeError:
            raise ValueError(
                f"{name} must be an integer >= 1 or a sequence of them, got {k!r}"
            ) from None
    if not values:
        raise ValueError(f"{name} is empty; pass at least one K, e.g. {name}=(1, 2, 4, 8)")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must hold integers >= 1, got {value!r}")
    return tuple(sorted({int(v) for v in values}))


def equal_labels(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Elementwise ``left == right`` for broadcastable label arrays, exact for any label kind."""
    if left.dtype.kind == right.dtype.kind == "i":
        return left == right
    _, (left_codes, right_codes) = encode_labels(left.ravel(), right.ravel())
    return left_codes.reshape(left.shape) == right_codes.reshape(right.shape)


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``; raise naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
