"""Input checks done once, at the entry of each public call.

Every message names the argument, says what was wrong in the user's terms, and says what to
do. The numeric code behind these checks trusts its inputs.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_embeddings(embeddings: object, name: str = "embeddings") -> Tensor:
    """Return `embeddings` if it is a finite, floating, non-empty (N, D) tensor; raise otherwise."""
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(embeddings)!r}")
    if embeddings.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (N, D), got shape {tuple(embeddings.shape)}; "
            "flatten or reshape it, e.g. embeddings.view(len(embeddings), -1)"
        )
    if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(embeddings.shape)}); pass at least one row"
        )
    if not embeddings.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {embeddings.dtype}")
    if not bool(torch.isfinite(embeddings).all()):
        bad = int((~torch.isfinite(embeddings)).any(dim=1).sum())
        raise ValueError(
            f"{name} contains NaN or inf in {bad} of {len(embeddings)} rows; "
            "check the model output (learning rate, mixed precision overflow, division by zero)"
        )
    return embeddings


def check_labels(
    labels: object, num_rows: int, name: str = "labels", rows_name: str = ""
) -> Tensor:
    """Return `labels` if it is a 1-D tensor of any integer dtype or bool with `num_rows`
    entries; raise a TypeError or ValueError naming `name` otherwise."""
    rows_name = rows_name or "embeddings"
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"{name} must be a 1-D torch.Tensor of integer class ids, got {type(labels)!r}"
        )
    if labels.dim() != 1:
        raise ValueError(
            f"{name} must be 1-D (one class id per row), got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"{name} has dtype {labels.dtype}; class labels must be integers or bool "
            "(use labels.long(), or map class names to ids first)"
        )
    if len(labels) != num_rows:
        raise ValueError(f"{name} has {len(labels)} entries but {rows_name} has {num_rows} rows")
    return labels


def check_same_device(**tensors: Tensor | None) -> None:
    """Raise if the given tensors are not all on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"inputs are on different devices ({listing}); move them to one device")


def check_finite(value: object, name: str) -> float:
    """Return `value` as a float if it is a finite real number; raise naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}; pass a finite value")
    return float(value)


def check_positive(value: float, name: str, allow_zero: bool = False) -> float:
    """Return `value` if it is finite and > 0 (or >= 0 with `allow_zero`); raise otherwise."""
    value = check_finite(value, name)
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_interval(value: float, name: str, low: float, high: float, unit: str = "") -> float:
    """Return `value` if it is finite and low <= value <= high; raise naming `name` otherwise."""
    value = check_finite(value, name)
    if not low <= value <= high:
        unit = f" ({unit})" if unit else ""
        raise ValueError(f"{name} must be in [{low:g}, {high:g}]{unit}, got {value}")
    return value


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """Return `value` if it is an integer >= `minimum` (not a bool); raise naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_non_negative(value: float, name: str) -> float:
    """Return `value` if it is finite and >= 0; raise naming `name` otherwise."""
    return check_positive(value, name, allow_zero=True)


def check_range(low: float, high: float, unit: str) -> Callable[[Any, str], float]:
    """A check for a finite value in [low, high] (`unit` names its unit in the message)."""

    def check(value: float, name: str) -> float:
        return check_interval(value, name, low, high, unit)

    return check


def optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """`check` that also accepts None (a value the loss derives from the others)."""

    def check_or_none(value: object, name: str) -> Any:
        return None if value is None else check(value, name)

    return check_or_none


def check_flag(value: object, name: str) -> bool:
    """Return `value` if it is a bool; raise a TypeError naming `name` otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


class HyperParameter:
    """A module attribute checked every time it is set, at construction and later alike.

    `check(value, name)` returns the value to store or raises an error naming `name`, so
    `loss.margin = float("nan")` fails as `Loss(margin=float("nan"))` does. Declare it on
    the class; assign it in `__init__` as a plain attribute:

        >>> from torch import nn
        >>> class Scaled(nn.Module):
        ...     scale = HyperParameter(check_positive)
        ...     def __init__(self, scale: float = 1.0) -> None:
        ...         super().__init__()
        ...         self.scale = scale
        >>> Scaled(2).scale
        2.0
        >>> Scaled(float("inf"))
        Traceback (most recent call last):
        ...
        ValueError: scale must be a finite number, got inf; pass a finite value
    """

    def __init__(self, check: Callable[[Any, str], Any]) -> None:
        self.check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = f"_hyper_{name}"

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance.__dict__[self.slot]

    def __set__(self, instance: object, value: Any) -> None:
        instance.__dict__[self.slot] = self.check(value, self.name)


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    """Return `value` if it is one of `choices`; raise a ValueError listing them otherwise."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


class CheckedBatch(NamedTuple):
    """A checked batch and its reference set, cast to the dtype the computation runs in."""

    embeddings: Tensor
    labels: Tensor | None
    ref_emb: Tensor
    ref_labels: Tensor | None
    ref_is_query: bool
    dtype: torch.dtype


def check_batch(
    embeddings: Tensor,
    labels: Tensor | None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    labels_optional: bool = False,
    check_label: Callable[[Tensor, int, str, str], Tensor] = check_labels,
) -> CheckedBatch:
    """Check a batch, its labels and an optional reference set; upcast half precision.

    The reference set defaults to the batch itself (`ref_is_query`). Labels may be missing
    only when `labels_optional` (a loss given an explicit indices_tuple). Each label tensor
    is checked, and returned, by `check_label(labels, num_rows, name, rows_name)`.
    """
    check_embeddings(embeddings)
    if labels is None and not labels_optional:
        raise ValueError("labels are required (a 1-D integer tensor, one class id per row)")
    if labels is not None:
        labels = check_label(labels, len(embeddings), "labels", "embeddings")
    if ref_labels is not None and ref_emb is None:
        raise ValueError("ref_labels was given without ref_emb; pass both or neither")
    if ref_emb is not None:
        check_embeddings(ref_emb, "ref_emb")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb has {ref_emb.shape[1]} features per row but embeddings has "
                f"{embeddings.shape[1]}; both must live in the same embedding space"
            )
        if ref_labels is None and not labels_optional:
            raise ValueError("ref_emb needs ref_labels, one class id per reference row")
        if ref_labels is not None:
            ref_labels = check_label(ref_labels, len(ref_emb), "ref_labels", "ref_emb")
    check_same_device(embeddings=embeddings, labels=labels, ref_emb=ref_emb, ref_labels=ref_labels)
    dtype = embeddings.dtype
    work = compute_dtype(dtype)
    embeddings = embeddings.to(work)
    if ref_emb is None:
        return CheckedBatch(embeddings, labels, embeddings, labels, True, dtype)
    return CheckedBatch(embeddings, labels, ref_emb.to(work), ref_labels, False, dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss computes in: float32 for half types, the input dtype otherwise."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def error_reason(error: BaseException) -> str:
    """The first non-blank line of ``error``'s message, or its type name when it has none:
    the short cause that a wrapping error message quotes.

    >>> error_reason(OSError("unexpected end of file\\nmore detail")), error_reason(KeyError())
    ('unexpected end of file', 'KeyError')
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


FILE_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)
"""What numpy, zipfile and zlib raise on reading a damaged file (truncated, not a zip archive,
a corrupt compressed member, a missing key): a reader catches these and raises its own error
naming the file, with `error_reason` as the cause."""
