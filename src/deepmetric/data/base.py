"""The dataset shape every deepmetric data source shares, and the open-set split."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

Split = Literal["train", "test", "all"]
Transform = Callable[[torch.Tensor], torch.Tensor]
SPLITS: tuple[str, ...] = ("train", "test", "all")


class DataError(ValueError):
    """Data that cannot be used as asked (no images, a missing label column, a single class):
    the message names the file or folder and the fix."""


class ImageReadError(DataError, OSError):
    """An image file that cannot be read (truncated, damaged or not an image)."""


def check_split(split: str) -> str:
    """Return ``split`` if it is "train", "test" or "all"; raise a ValueError otherwise."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def encode_labels(values: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary class values (integers or strings) to codes 0..C-1 in sorted order.

    Returns ``(codes, classes)`` with ``classes[codes[i]] == values[i]``. Strings that all
    spell integers are compared as integers, so "10" sorts after "9".

    >>> codes, classes = encode_labels(["b", "a", "b"])
    >>> codes.tolist(), classes.tolist()
    ([1, 0, 1], ['a', 'b'])
    """
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {array.shape}")
    if array.dtype.kind in "USO":
        text = array.astype(str)
        stripped = np.char.strip(text)
        if stripped.size and all(s.lstrip("+-").isdigit() for s in stripped):
            array = stripped.astype(np.int64)
        else:
            array = text
    elif array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(
                "labels are floats that are not whole numbers; class labels must be integers "
                "or strings: convert them (e.g. labels.astype(int)) or pick the right column"
            )
        array = array.astype(np.int64)
    elif array.dtype.kind == "b":
        array = array.astype(np.int64)
    classes, codes = np.unique(array, return_inverse=True)
    return codes.reshape(-1).astype(np.int64), classes


def open_set_split(labels: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the train and test samples under the open-set protocol of CUB-200 and Cars-196.

    The distinct labels are sorted; the first half of the classes (the larger half when their
    number is odd) is for training, the second half for testing, so no class is in both.

    >>> train, test = open_set_split([3, 0, 2, 1, 0])
    >>> train.tolist(), test.tolist()
    ([1, 3, 4], [0, 2])
    """
    codes, classes = encode_labels(labels)
    if len(classes) < 2:
        raise DataError(
            f"the open-set split needs at least 2 classes, got {len(classes)}: "
            "add classes or use split='all'"
        )
    is_train = codes < (len(classes) + 1) // 2
    return np.flatnonzero(is_train), np.flatnonzero(~is_train)


def split_indices(labels: Sequence | np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` ("train", "test" or "all") under :func:`open_set_split`."""
    check_split(split)
    if split == "all":
        return np.arange(len(labels))
    train, test = open_set_split(labels)
    return train if split == "train" else test


def default_class_names(labels: np.ndarray) -> list[str]:
    """``str(i)`` for every label id ``i`` from 0 to the largest label: the names of data
    that has none."""
    return [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]


class LabeledDataset(Dataset):
    """A map-style dataset of ``(tensor, label)`` pairs with every label known up front.

    Subclasses set ``labels``: a read-only 1-D int64 NumPy array with one class index per
    sample, which a P x K batch sampler reads without loading any input. ``class_names``
    names each label id: ``class_names[label]`` (the kanji, the folder name, the table's
    label value); data without names has ``str(label)``.
    """

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        """The name of each label id, ``class_names[label]``."""
        return default_class_names(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of distinct labels in this dataset."""
        return len(np.unique(self.labels))


class ArrayDataset(LabeledDataset):
    """Samples held in memory: ``inputs[i]`` (optionally transformed) and ``labels[i]``.

    Parameters: ``inputs`` of shape (N, ...), a tensor or array (uint8 inputs are scaled to
    float32 in [0, 1] per item); ``labels`` of shape (N,), integers; ``transform`` applied to
    each float32 input tensor; ``class_names`` the name of each label id (default
    ``str(label)``).

    >>> ds = ArrayDataset(torch.zeros(4, 3), [0, 0, 1, 1], class_names=["cat", "dog"])
    >>> x, y = ds[2]
    >>> tuple(x.shape), y, ds.class_names[y]
    ((3,), 1, 'dog')
    """

    def __init__(
        self,
        inputs: torch.Tensor | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        transform: Transform | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        inputs = torch.as_tensor(inputs)
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
        if labels.size and labels.dtype.kind not in "iu":
            raise ValueError(
                f"labels must be integers, got dtype {labels.dtype}: "
                "map class names to integers first (deepmetric.data.encode_labels)"
            )
        if inputs.ndim == 0 or inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"labels has {labels.shape[0]} entries but inputs has "
                f"{inputs.shape[0] if inputs.ndim else 0} rows: they must match"
            )
        self.inputs = inputs
        self.labels = labels.astype(np.int64)
        self.labels.flags.writeable = False
        self.transform = transform
        if class_names is not None:
            names = [str(name) for name in class_names]
            if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(names)):
                raise ValueError(
                    f"class_names has {len(names)} names but the labels run from "
                    f"{self.labels.min()} to {self.labels.max()}: give one name per label id "
                    "0..max(labels)"
                )
        self._class_names = None if class_names is None else names

    @property
    def class_names(self) -> list[str]:
        """The name of each label id, ``class_names[label]``."""
        if self._class_names is None:
            return default_class_names(self.labels)
        return list(self._class_names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.inputs[index]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])
