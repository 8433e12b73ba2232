"""The shipped Kanji-Fonts-32 file: shapes, class counts, split disjointness and load time."""

from __future__ import annotations

import json
import time
import unicodedata
from importlib import resources

import numpy as np
import pytest
import torch

from deepmetric.data import KanjiFonts, load_kanji_fonts, open_set_split
from deepmetric.data.kanji_fonts import DATA_STEM, _read_shipped


@pytest.fixture(scope="module")
def meta() -> dict:
    text = (resources.files("deepmetric.data") / f"{DATA_STEM}.json").read_text("utf-8")
    return json.loads(text)


@pytest.fixture(scope="module")
def train() -> KanjiFonts:
    return load_kanji_fonts("train")


@pytest.fixture(scope="module")
def test() -> KanjiFonts:
    return load_kanji_fonts("test")


def test_shipped_files_and_size(meta: dict) -> None:
    folder = resources.files("deepmetric.data")
    packed = (folder / f"{DATA_STEM}.npy.xz").read_bytes()
    assert len(packed) < 8_000_000
    attribution = (folder / "FONTS-ATTRIBUTION.txt").read_text("utf-8")
    for face in meta["faces"]:
        assert face["name"] in attribution
        assert face["licence"]
        assert "GPL" not in face["licence"]
    assert 40 <= meta["num_faces"] <= 60
    assert 2_700 <= meta["num_classes"] <= 2_965
    chars = meta["characters"]
    assert len(chars) == len(set(chars)) == meta["num_classes"]
    assert all(unicodedata.name(c).startswith("CJK UNIFIED IDEOGRAPH") for c in chars)


def test_shapes_and_dtypes(train: KanjiFonts, meta: dict) -> None:
    faces = meta["num_faces"]
    assert train.images.shape == (len(train), 1, 32, 32)
    assert train.images.dtype == np.uint8
    assert set(np.unique(train.images[:1000]).tolist()) <= {0, 255}
    assert train.labels.shape == train.font_ids.shape == (len(train),)
    assert train.labels.dtype == np.int64
    assert len(train) == meta["train_classes"] * faces
    assert train.num_classes == meta["train_classes"]
    counts = np.bincount(train.labels)
    assert (counts == faces).all()  # every class drawn once by every face
    assert len(train.fonts) == faces
    image, label = train[5]
    assert image.dtype == torch.float32 and tuple(image.shape) == (1, 32, 32)
    assert 0.0 <= float(image.min()) and float(image.max()) == 1.0
    assert label == int(train.labels[5])


def test_every_image_has_ink(train: KanjiFonts) -> None:
    ink = train.images.reshape(len(train), -1).astype(bool).sum(axis=1)
    assert ink.min() > 10
    assert ink.max() < 32 * 32 * 0.8


def test_open_set_split_is_disjoint_and_complete(
    train: KanjiFonts, test: KanjiFonts, meta: dict
) -> None:
    train_classes, test_classes = set(train.labels.tolist()), set(test.labels.tolist())
    assert train_classes.isdisjoint(test_classes)
    assert len(train_classes | test_classes) == meta["num_classes"]
    assert max(train_classes) < min(test_classes)
    assert len(train) + len(test) == meta["num_classes"] * meta["num_faces"]
    everything = load_kanji_fonts("all")
    train_idx, test_idx = open_set_split(everything.labels)
    assert np.array_equal(everything.images[test_idx], test.images)
    assert np.array_equal(everything.labels[train_idx], train.labels)


def test_metadata_per_sample(train: KanjiFonts, test: KanjiFonts, meta: dict) -> None:
    assert train.character(0) == meta["characters"][0] == "亜"
    assert test.character(0) == meta["characters"][meta["train_classes"]]
    assert train.font(1) == meta["faces"][1]["name"]
    assert {"name", "package", "file", "licence"} <= set(train.font_info[0])
    assert "KanjiFonts(split='test'" in repr(test)


def test_arrays_are_read_only(train: KanjiFonts) -> None:
    with pytest.raises(ValueError):
        train.labels[0] = 3
    with pytest.raises(ValueError):
        train.images[0, 0, 0, 0] = 1


def test_transform_is_applied() -> None:
    ds = load_kanji_fonts("test", transform=lambda x: 1.0 - x)
    image, _ = ds[0]
    assert float(image.max()) == 1.0 and float(image[0, 0, 0]) == 1.0


def test_bad_split_names_the_argument() -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        load_kanji_fonts("validation")


def test_loads_in_under_a_second() -> None:
    # CPU time, not wall time, so a busy machine does not fail the test
    _read_shipped.cache_clear()
    start = time.process_time()
    everything = load_kanji_fonts("all")
    assert time.process_time() - start < 1.0
    assert len(everything) == everything.num_classes * len(everything.fonts)


def test_class_names_are_the_characters() -> None:
    test = load_kanji_fonts("test")
    assert test.class_names == list(test.characters)
    assert test.class_names[int(test.labels[5])] == test.character(5)
