"""The data side of training: load the configured split, subsample classes, gather batches.

Batches are gathered by index in one vectorised step for in-memory data sets (the bundled
ones and feature tables) and item by item for image folders, which read files anyway.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from deepmetric.data import (
    ArrayDataset,
    ImageFolderDataset,
    LabeledDataset,
    RandomShift,
    load_digits,
    load_feature_table,
    load_kanji_fonts,
)
from deepmetric.training.config import DataConfig

__all__ = ["LabeledSubset", "data_from_spec", "gather", "images_of", "load_split"]


class LabeledSubset(LabeledDataset):
    """The items ``indices`` of a labelled dataset, with their labels."""

    def __init__(self, dataset: LabeledDataset, indices: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = dataset.labels[self.indices]

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


def load_split(config: DataConfig, split: str, *, train: bool = False) -> LabeledDataset:
    """The ``split`` ("train", "test" or "all") of the configured data set, subsampled.

    ``data.train_classes`` / ``data.test_classes`` classes are drawn at random with
    ``data.seed`` (the train count for "train", the test count otherwise) and the first
    ``data.samples_per_class`` samples of each are kept. ``train`` turns augmentation on.
    """
    dataset = _load(config, split, train)
    classes = np.unique(dataset.labels)
    wanted = config.train_classes if split == "train" else config.test_classes
    keep = np.ones(len(dataset.labels), dtype=bool)
    if wanted is not None and wanted < len(classes):
        rng = np.random.default_rng([config.seed, 0 if split == "train" else 1])
        keep &= np.isin(dataset.labels, rng.choice(classes, wanted, replace=False))
    if config.samples_per_class is not None:
        order = np.argsort(dataset.labels, kind="stable")
        sorted_labels = dataset.labels[order]
        rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels)
        keep[order[rank >= config.samples_per_class]] = False
    if keep.all():
        return dataset
    return LabeledSubset(dataset, np.flatnonzero(keep))


def data_from_spec(spec: str, split: str, config: DataConfig) -> LabeledDataset:
    """A data set named on the command line: "kanji_fonts", "digits", an image folder or a
    feature table file; read with the run's data settings, without subsampling."""
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
