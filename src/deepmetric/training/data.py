"""The data side of training: load the configured split, subsample classes, gather batches.

Batches are gathered by index in one vectorised step for in-memory data sets (the bundled
ones and feature tables) and item by item for image folders, which read files anyway.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from deepmetric.data import (
    ArrayDataset,
    DataError,
    ImageFolderDataset,
    LabeledDataset,
    RandomShift,
    load_digits,
    load_feature_table,
    load_kanji_fonts,
    open_set_split,
)
from deepmetric.training.config import DataConfig

__all__ = [
    "LabeledSubset",
    "data_from_spec",
    "gather",
    "images_of",
    "is_run_data",
    "load_split",
    "validation_classes",
]


class LabeledSubset(LabeledDataset):
    """The items ``indices`` of a labelled dataset, with their labels and class names."""

    def __init__(self, dataset: LabeledDataset, indices: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = dataset.labels[self.indices]

    @property
    def class_names(self) -> list[str]:
        """The names of the whole dataset's label ids (labels keep their ids in a subset)."""
        return self.dataset.class_names

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[int(self.indices[index])]


def _load(config: DataConfig, split: str, train: bool) -> LabeledDataset:
    transform = RandomShift(config.augment_shift) if train and config.augment_shift else None
    if config.name == "kanji_fonts":
        return load_kanji_fonts(split, transform)
    if config.name == "digits":
        return load_digits(split, transform)
    if config.name == "image_folder":
        return ImageFolderDataset(
            config.path, split, config.image_mode, config.image_size, transform
        )
    column = config.label_column  # a number is a column index (plain .npy arrays)
    label_column = int(column) if column.lstrip("-").isdigit() else column
    return load_feature_table(config.path, label_column, split)  # vectors: no shifts


def _draw(classes: np.ndarray, wanted: int | None, seed: int, stream: int) -> np.ndarray:
    """``wanted`` of ``classes`` drawn at random (all of them when None or not fewer)."""
    if wanted is None or wanted >= len(classes):
        return classes
    return np.random.default_rng([seed, stream]).choice(classes, wanted, replace=False)


def _training_classes(config: DataConfig, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The drawn training classes and the validation classes, from the classes of the data's
    training split: ``floor(data.val_share * C)`` classes are held out first (none when that
    is fewer than 2), then ``data.train_classes`` of the rest are drawn."""
    held_out = math.floor(config.val_share * len(classes))
    if held_out < 2:
        validation = classes[:0]
    else:
        validation = np.sort(
            np.random.default_rng([config.seed, 2]).choice(classes, held_out, False)
        )
    rest = np.setdiff1d(classes, validation)
    return _draw(rest, config.train_classes, config.seed, 0), validation


def validation_classes(config: DataConfig) -> int:
    """How many classes the validation split holds (0: the data has too few to hold out)."""
    dataset = _load(config, "train", train=False)
    return len(_training_classes(config, np.unique(dataset.labels))[1])


def load_split(config: DataConfig, split: str, *, train: bool = False) -> LabeledDataset:
    """The ``split`` ("train", "val", "test" or "all") of the configured data set, subsampled.

    The validation classes ("val") are ``data.val_share`` of the data's training classes,
    drawn with ``data.seed`` and never trained on; ``data.train_classes`` of the remaining
    training classes ("train") and ``data.test_classes`` of the test classes ("test") are
    drawn at random with ``data.seed``; "all" holds the three draws together. The first
    ``data.samples_per_class`` samples of each class are kept. ``train`` turns augmentation
    on. Raises `DataError` for "val" when the data has too few training classes to hold out.
    """
    dataset = _load(
        config, "test" if split == "test" else "train" if split == "val" else split, train
    )
    classes = np.unique(dataset.labels)
    if split == "all":
        if config.train_classes is None and config.test_classes is None and not config.val_share:
            drawn = classes
        else:
            train_rows, test_rows = open_set_split(classes)
            trained, validation = _training_classes(config, classes[train_rows])
            tested = _draw(classes[test_rows], config.test_classes, config.seed, 1)
            drawn = np.concatenate([trained, validation, tested])
    elif split in ("train", "val"):
        trained, validation = _training_classes(config, classes)
        drawn = trained if split == "train" else validation
        if split == "val" and not len(drawn):
            raise DataError(
                f"the training split of {config.name} has {len(classes)} classes: "
                f"data.val_share={config.val_share:g} holds out fewer than 2, so there is no "
                "validation split; raise data.val_share or use eval.select_split=train"
            )
    else:
        drawn = _draw(classes, config.test_classes, config.seed, 1)
    keep = np.ones(len(dataset.labels), dtype=bool)
    if len(drawn) < len(classes):
        keep &= np.isin(dataset.labels, drawn)
    if config.samples_per_class is not None:
        order = np.argsort(dataset.labels, kind="stable")
        sorted_labels = dataset.labels[order]
        rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels)
        keep[order[rank >= config.samples_per_class]] = False
    if keep.all():
        return dataset
    return LabeledSubset(dataset, np.flatnonzero(keep))


def is_run_data(spec: str, config: DataConfig) -> bool:
    """Whether the command-line data set ``spec`` is the one the run was trained on."""
    if spec in ("kanji_fonts", "digits"):
        return config.name == spec
    return config.path is not None and Path(spec).resolve() == Path(config.path).resolve()


def data_from_spec(spec: str, split: str, config: DataConfig) -> LabeledDataset:
    """A data set named on the command line: "kanji_fonts", "digits", an image folder or a
    feature table file, read with the run's data settings.

    The run's own data set keeps the run's class subsample (`load_split`), so the items
    are those the run evaluated and indexed; another data set is read whole.
    """
    if is_run_data(spec, config):
        return load_split(config, split)
    if split == "val":
        raise DataError(
            f"--split val is the validation classes of the run's own data set, not of {spec}: "
            "use train, test or all"
        )
    if spec in ("kanji_fonts", "digits"):
        name, path = spec, None
    elif Path(spec).is_dir():
        name, path = "image_folder", spec
    elif Path(spec).is_file():
        name, path = "feature_table", spec
    else:
        raise FileNotFoundError(
            f"{spec!r} is neither a bundled data set (kanji_fonts, digits) nor an existing "
            "folder of images or feature table file"
        )
    settings = DataConfig(
        name=name,
        path=path,
        train_classes=None,
        test_classes=None,
        image_size=config.image_size,
        image_mode=config.image_mode,
        label_column=config.label_column,
    )
    return _load(settings, split, train=False)


def _base(dataset: Dataset, indices: np.ndarray) -> tuple[Dataset, np.ndarray]:
    while isinstance(dataset, LabeledSubset):
        dataset, indices = dataset.dataset, dataset.indices[indices]
    return dataset, indices


def gather(dataset: LabeledDataset, indices: list[int] | np.ndarray) -> torch.Tensor:
    """The inputs of items ``indices`` as one float32 batch tensor."""
    base, rows = _base(dataset, np.asarray(indices, dtype=np.int64))
    if isinstance(base, ArrayDataset) and base.transform is None:
        x = base.inputs[torch.from_numpy(rows)]
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return torch.stack([base[int(i)][0] for i in rows])


def images_of(dataset: LabeledDataset, indices: np.ndarray) -> np.ndarray | None:
    """The items ``indices`` as (n, C, H, W) float images in [0, 1], or None for vectors."""
    x = gather(dataset, indices) if len(indices) else None
    return None if x is None or x.ndim != 4 else x.clamp(0, 1).numpy()
