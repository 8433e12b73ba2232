"""Kanji-Fonts-32: the image data set bundled with deepmetric.

Each class is one JIS X 0208 level-1 kanji; each sample is that character drawn by a
different type face (print weights, brush calligraphy, handwriting styles, bitmap-like
faces), rendered to a 32x32 binary image. ``docs/data.md`` describes how it was built
(``tools/build_kanji_fonts.py``) and ``FONTS-ATTRIBUTION.txt`` lists each face and licence.
"""

from __future__ import annotations

import functools
import json
import lzma
from importlib import resources
from typing import Any

import numpy as np
import torch

from deepmetric.data.base import ArrayDataset, Transform, check_split, split_indices

DATA_STEM = "kanji_fonts_32"


@functools.lru_cache(maxsize=1)
def _read_shipped() -> tuple[np.ndarray, dict[str, Any]]:
    """The packed bit rows (N, 128) and the metadata, read once per process."""
    folder = resources.files("deepmetric.data")
    meta = json.loads((folder / f"{DATA_STEM}.json").read_text(encoding="utf-8"))
    with (folder / f"{DATA_STEM}.npy.xz").open("rb") as raw, lzma.open(raw) as handle:
        bits = np.load(handle, allow_pickle=False)
    expected = (meta["num_classes"] * meta["num_faces"], meta["image_size"] ** 2 // 8)
    if bits.shape != expected or bits.dtype != np.uint8:
        raise RuntimeError(
            f"{DATA_STEM}.npy.xz holds {bits.dtype} {bits.shape}, expected uint8 {expected}: "
            "the package data is damaged; reinstall deepmetric"
        )
    bits.flags.writeable = False
    return bits, meta


class KanjiFonts(ArrayDataset):
    """The Kanji-Fonts-32 samples of one split, as a dataset of ``(image, label)`` pairs.

    Attributes:
        images: uint8 array (N, 1, 32, 32), ink 255 on background 0.
        labels: int64 array (N,), the class index of each sample, global over the whole set
            (train classes are 0..C/2-1, test classes follow), so splits never share a label.
        font_ids: int64 array (N,), the index in ``fonts`` of the face that drew each sample.
        characters: all C class characters; ``characters[label]`` is a sample's kanji.
        class_names: the same characters as a list (the name every data set has).
        fonts: the face names (family and style), in face order.
        font_info: per face, a dict with its name, Debian package, file and licence.
        split: "train", "test" or "all".

    Items are ``(image, label)`` with the image a float32 tensor (1, 32, 32) in [0, 1],
    passed through ``transform`` when given.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        font_ids: np.ndarray,
        meta: dict[str, Any],
        split: str,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(torch.from_numpy(images), labels, transform, meta["characters"])
        images.flags.writeable = False
        font_ids.flags.writeable = False
        self.images = images
        self.font_ids = font_ids
        self.characters: tuple[str, ...] = tuple(meta["characters"])
        self.font_info: tuple[dict[str, str], ...] = tuple(meta["faces"])
        self.fonts: tuple[str, ...] = tuple(face["name"] for face in meta["faces"])
        self.split = split

    def character(self, index: int) -> str:
        """The kanji that sample ``index`` shows."""
        return self.characters[int(self.labels[index])]

    def font(self, index: int) -> str:
        """The name of the face that drew sample ``index``."""
        return self.fonts[int(self.font_ids[index])]

    def __repr__(self) -> str:
        return (
            f"KanjiFonts(split={self.split!r}, samples={len(self)}, "
            f"classes={self.num_classes}, fonts={len(self.fonts)})"
        )


def load_kanji_fonts(split: str = "train", transform: Transform | None = None) -> KanjiFonts:
    """Load the bundled Kanji-Fonts-32 data set (about 2,800 kanji x about 50 faces).

    ``split`` is "train" (the first half of the classes in JIS order), "test" (the second
    half: classes never seen in training, as in the CUB-200 / Cars-196 open-set protocol) or
    "all". ``transform`` is applied to each float32 image tensor when an item is read.
    The shipped file is decompressed once per process (well under a second).

    >>> train = load_kanji_fonts("train")
    >>> train.images.shape[1:], train.images.dtype
    ((1, 32, 32), dtype('uint8'))
    >>> image, label = train[0]
    >>> train.character(0), train.font(0) == train.fonts[0]
    ('亜', True)
    """
    check_split(split)
    bits, meta = _read_shipped()
    num_classes, num_faces = meta["num_classes"], meta["num_faces"]
    size = meta["image_size"]
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), num_faces)
    font_ids = np.tile(np.arange(num_faces, dtype=np.int64), num_classes)
    # the open-set split by class index: classes sorted and halved, as open_set_split does
    classes = np.arange(num_classes)
    selected = classes[split_indices(classes, split)]
    rows = (selected[:, None] * num_faces + np.arange(num_faces)).reshape(-1)
    images = np.unpackbits(bits[rows], axis=1).reshape(len(rows), 1, size, size)
    images *= 255
    return KanjiFonts(images, labels[rows], font_ids[rows], meta, split, transform)
