"""Tables of precomputed feature vectors with a label column: CSV, Parquet, .npy and .npz."""

from __future__ import annotations

import csv
import difflib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from deepmetric._validation import FILE_READ_ERRORS, error_reason
from deepmetric.data.base import (
    ArrayDataset,
    DataError,
    Transform,
    check_split,
    encode_labels,
    split_indices,
)

TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".parquet", ".pq", ".npy", ".npz")


class FeatureTableDataset(ArrayDataset):
    """Feature vectors and labels read from a table; items are ``(features, label)``.

    Attributes: ``features`` (float32 tensor (N, D)), ``labels`` (int64 (N,), global class
    indices), ``classes`` (the original label values, sorted; ``classes[label]``),
    ``class_names`` (the same values as strings), ``feature_columns`` (the column names or
    indices used), ``path`` and ``split``.
    """

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        classes: np.ndarray,
        feature_columns: Sequence[str | int],
        path: Path,
        split: str,
        transform: Transform | None = None,
    ) -> None:
        names = [str(value) for value in classes.tolist()]
        super().__init__(torch.from_numpy(features), labels, transform, class_names=names)
        self.features = self.inputs
        self.classes = classes
        self.feature_columns = tuple(feature_columns)
        self.path = path
        self.split = split

    def __repr__(self) -> str:
        return (
            f"FeatureTableDataset(path={os.fspath(self.path)!r}, split={self.split!r}, "
            f"samples={len(self)}, dim={self.features.shape[1]}, classes={self.num_classes})"
        )


def _missing_column(path: Path, argument: str, name: object, columns: Sequence) -> DataError:
    names = [str(c) for c in columns]
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    shown = ", ".join(repr(c) for c in names[:20]) + (", ..." if len(names) > 20 else "")
    return DataError(
        f"{os.fspath(path)}: {argument} {name!r} is not a column of the table{hint}; "
        f"its columns are [{shown}]: pass {argument}=<one of them>"
    )


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter=delimiter))
    if not rows or not rows[0]:
        raise DataError(f"{os.fspath(path)}: the table is empty; it needs a header row")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(
                f"{os.fspath(path)}: line {number} has {len(row)} fields but the header has "
                f"{len(header)}: fix the row"
            )
    if not body:
        raise DataError(f"{os.fspath(path)}: the table has a header but no rows")
    columns = list(zip(*body, strict=True))
    return {name: np.array(values, dtype=str) for name, values in zip(header, columns, strict=True)}


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                f"reading {os.fspath(path)!r} needs pyarrow or pandas: `pip install pyarrow`, "
                "or save the table as CSV or .npz"
            ) from None
        frame = pd.read_parquet(path)
        return {str(c): frame[c].to_numpy() for c in frame.columns}
    table = pq.read_table(path)
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _read_numpy(path: Path) -> dict[str | int, np.ndarray]:
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    array = np.load(path, allow_pickle=False)
    if array.dtype.names:
        return {name: array[name] for name in array.dtype.names}
    if array.ndim != 2:
        raise DataError(
            f"{os.fspath(path)}: a .npy table must be 2-D (rows x columns) or a structured "
            f"array, got shape {array.shape}"
        )
    return {i: array[:, i] for i in range(array.shape[1])}


def _read_table(path: Path) -> dict:
    """The columns of the table file ``path``; a damaged file raises a `DataError` naming it."""
    suffix = path.suffix.lower()
    readers = {".csv": _read_csv, ".tsv": _read_csv, ".parquet": _read_parquet}
    readers.update({".pq": _read_parquet, ".npy": _read_numpy, ".npz": _read_numpy})
    if suffix not in readers:
        raise DataError(
            f"{os.fspath(path)}: unknown table format {suffix!r}; use one of {TABLE_SUFFIXES}"
        )
    try:
        return readers[suffix](path)
    except DataError:
        raise
    except FILE_READ_ERRORS as error:
        reason = error_reason(error)
        raise DataError(
            f"{os.fspath(path)}: cannot read the table ({reason}): the file is damaged or not "
            f"a {suffix} table; write it again"
        ) from error


def _column(table: dict, path: Path, argument: str, name: str | int) -> str | int:
    if name in table:
        return name
    if isinstance(name, int) and all(isinstance(k, int) for k in table):
        if -len(table) <= name < len(table):
            return list(table)[name]
    if isinstance(name, str) and all(isinstance(k, int) for k in table):
        raise DataError(
            f"{os.fspath(path)}: a plain .npy array has no column names, so {argument}="
            f"{name!r} cannot be found: pass {argument}=<column index> (e.g. -1 for the last "
            "column), or save a .npz or structured array with named columns"
        )
    raise _missing_column(path, argument, name, list(table))


def _features(table: dict, path: Path, columns: Sequence[str | int]) -> np.ndarray:
    blocks = []
    for name in columns:
        values = table[name]
        try:
            if values.dtype == object and len(values) and np.ndim(values[0]) == 1:
                block = np.stack([np.asarray(v, dtype=np.float32) for v in values])  # vectors
            else:
                block = np.asarray(values, dtype=np.float32)
        except (ValueError, TypeError):
            raise DataError(
                f"{os.fspath(path)}: feature column {name!r} is not numeric: list the numeric "
                "columns in feature_columns=, or name this one as label_column/split_column"
            ) from None
        blocks.append(block.reshape(len(block), -1))
    features = np.concatenate(blocks, axis=1)
    bad = ~np.isfinite(features)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{os.fspath(path)}: {int(bad.sum())} feature values are NaN or infinite (first at "
            f"row {int(row)}, feature {int(col)}): clean or drop those rows"
        )
    return np.ascontiguousarray(features)


def _split_mask(values: np.ndarray, path: Path, name: str | int) -> tuple[np.ndarray, np.ndarray]:
    text = np.char.lower(np.char.strip(np.asarray(values).astype(str)))
    unknown = sorted(set(np.unique(text).tolist()) - {"train", "test"})
    if unknown:
        raise DataError(
            f"{os.fspath(path)}: split column {name!r} holds {unknown[:5]}; its values must be "
            "'train' or 'test'"
        )
    return text == "train", text == "test"


def load_feature_table(
    path: str | os.PathLike,
    label_column: str | int = "label",
    split: str = "all",
    split_column: str | int | None = None,
    feature_columns: Sequence[str | int] | None = None,
    transform: Transform | None = None,
) -> FeatureTableDataset:
    """Load feature vectors and their class labels from a table file.

    Formats, by file suffix: ``.csv`` / ``.tsv`` with a header row; ``.parquet`` (needs
    pyarrow or pandas); ``.npz`` whose arrays are the columns (a 2-D array is a block of
    features, e.g. ``np.savez(f, features=x, label=y)``); ``.npy`` as a structured array
    (named columns) or a plain 2-D numeric array whose columns are named by index
    (``label_column=-1`` for the last).

    Parameters:
        label_column: the column of class labels (integers or strings; the sorted distinct
            values become classes 0..C-1).
        split: "all", "train" or "test". Without ``split_column`` this is the open-set
            split: classes sorted, the first half for training, the second half for testing.
        split_column: a column of "train" / "test" values that chooses the split instead.
        feature_columns: the feature columns, in order; by default every other column.
        transform: applied to each feature tensor when an item is read.

    >>> ds = load_feature_table("birds.csv", "species", split="test")  # doctest: +SKIP
    """
    check_split(split)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature table {os.fspath(path)!r} does not exist")
    table = _read_table(path)
    label_key = _column(table, path, "label_column", label_column)
    split_key = None if split_column is None else _column(table, path, "split_column", split_column)
    if feature_columns is None:
        feature_keys = [k for k in table if k not in (label_key, split_key)]
        if not feature_keys:
            raise DataError(f"{os.fspath(path)}: the table has no columns besides the labels")
    else:
        feature_keys = [_column(table, path, "feature_columns", c) for c in feature_columns]
        if not feature_keys:
            raise ValueError("feature_columns is empty: name at least one column")
    lengths = {len(table[k]) for k in [label_key, *feature_keys]}
    if len(lengths) != 1:
        raise DataError(f"{os.fspath(path)}: the columns have different lengths {sorted(lengths)}")
    features = _features(table, path, feature_keys)
    try:
        codes, classes = encode_labels(table[label_key])
    except ValueError as error:
        raise DataError(f"{os.fspath(path)}: label column {label_key!r}: {error}") from None
    if split == "all":
        keep = np.arange(len(codes))
    elif split_key is None:
        keep = split_indices(codes, split)
    else:
        is_train, is_test = _split_mask(table[split_key], path, split_key)
        keep = np.flatnonzero(is_train if split == "train" else is_test)
    if keep.size == 0:
        raise DataError(f"{os.fspath(path)}: the {split!r} split has no rows")
    return FeatureTableDataset(
        features[keep], codes[keep], classes, feature_keys, path, split, transform
    )
