"""A folder of images with one sub-folder per class, loaded with Pillow."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deepmetric._validation import error_reason
from deepmetric.data.base import (
    DataError,
    ImageReadError,
    LabeledDataset,
    Transform,
    check_split,
    split_indices,
)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".pgm",
    ".ppm",
)


def load_image(
    path: str | os.PathLike, mode: str = "RGB", size: int | tuple[int, int] | None = None
) -> torch.Tensor:
    """Read one image with Pillow as a float32 tensor (C, H, W) in [0, 1].

    ``mode`` is "L" (grayscale, C = 1) or "RGB" (C = 3); ``size`` an int (square) or
    (height, width) to resize to, bilinearly. An unreadable or truncated file raises an
    `ImageReadError` (an OSError) naming the path.
    """
    try:
        with Image.open(path) as image:
            image.load()
            image = image.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = error_reason(error)
        raise ImageReadError(
            f"cannot read image {os.fspath(path)!r} ({reason}): the file is truncated, damaged "
            "or not an image; replace or delete it (ImageFolderDataset(..., verify=True) "
            "lists every bad file at once)"
        ) from error
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


class ImageFolderDataset(LabeledDataset):
    """Images in ``root/<class name>/<file>``, one sub-folder per class.

    Parameters:
        root: the folder holding one sub-folder per class (sub-folders are searched
            recursively; the class is the first-level sub-folder).
        split: "all", or "train" / "test" for the open-set split: class names sorted, the
            first half for training and the second half for testing.
        mode: "RGB" or "L" (grayscale).
        size: resize every image to this int (square) or (height, width); needed when the
            images differ in size and are batched.
        transform: applied to each image tensor after loading (see ``deepmetric.data.transforms``).
        extensions: file name endings that count as images (case-insensitive).
        verify: open every image now and raise one error listing all unreadable files.

    Attributes: ``classes`` (all class names, sorted; ``classes[label]`` names a label),
    ``class_names`` (the same names as a list), ``paths`` and ``labels`` (one per sample of
    the split, labels global over all classes so train and test never share one).

    >>> ds = ImageFolderDataset("photos", split="train", mode="RGB", size=64)  # doctest: +SKIP
    >>> image, label = ds[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "all",
        mode: str = "RGB",
        size: int | tuple[int, int] | None = None,
        transform: Transform | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        verify: bool = False,
    ) -> None:
        check_split(split)
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L' (grayscale), got {mode!r}")
        if size is not None:
            pair = (size, size) if isinstance(size, int) else tuple(size)
            if len(pair) != 2 or min(pair) < 1:
                raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {os.fspath(root)!r} does not exist or is not a folder: "
                "pass a folder with one sub-folder of images per class"
            )
        endings = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        by_class: dict[str, list[Path]] = {}
        empty = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            files = sorted(
                p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in endings
            )
            if files:
                by_class[folder.name] = files
            else:
                empty.append(folder.name)
        if not by_class:
            loose = [p.name for p in self.root.iterdir() if p.suffix.lower() in endings]
            hint = (
                f"; {len(loose)} images lie directly in it: move them into one sub-folder per class"
                if loose
                else ""
            )
            raise DataError(
                f"image folder {os.fspath(root)!r} has no images in class sub-folders "
                f"(looked for {', '.join(endings)}){hint}. Expected layout: "
                f"{os.fspath(root)}/<class name>/<image file>; pass extensions= for other "
                "file types"
            )
        if empty:
            warnings.warn(
                f"{len(empty)} sub-folders of {os.fspath(root)!r} hold no images and are "
                f"not classes: {empty[:5]}",
                stacklevel=2,
            )
        self.classes: tuple[str, ...] = tuple(by_class)
        paths = [p for files in by_class.values() for p in files]
        labels = np.repeat(np.arange(len(by_class)), [len(f) for f in by_class.values()])
        keep = split_indices(labels, split)
        self.paths: tuple[Path, ...] = tuple(paths[i] for i in keep)
        self.labels = labels[keep].astype(np.int64)
        self.labels.flags.writeable = False
        self.split, self.mode, self.size, self.transform = split, mode, size, transform
        if verify:
            self.verify()

    def verify(self) -> None:
        """Open every image of the split; raise one `ImageReadError` listing all unreadable
        files."""
        bad = []
        for path in self.paths:
            try:
                load_image(path, self.mode)
            except OSError as error:
                bad.append(f"{os.fspath(path)} ({error.__cause__})")
        if bad:
            listed = "\n  ".join(bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
            raise ImageReadError(
                f"{len(bad)} of {len(self.paths)} images under {os.fspath(self.root)!r} cannot "
                f"be read (truncated, damaged or not images); replace or delete them:\n  {listed}"
            )

    @property
    def class_names(self) -> list[str]:
        """The sub-folder name of each label id, ``class_names[label]``."""
        return list(self.classes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_image(self.paths[index], self.mode, self.size)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={os.fspath(self.root)!r}, split={self.split!r}, "
            f"samples={len(self)}, classes={self.num_classes})"
        )
