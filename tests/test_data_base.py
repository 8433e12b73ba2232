"""The shared dataset shape, the open-set split, digits and the torch augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmetric.data import (
    ArrayDataset,
    Compose,
    Normalize,
    RandomAffine,
    RandomCrop,
    RandomHorizontalFlip,
    RandomShift,
    encode_labels,
    load_digits,
    open_set_split,
)


def test_open_set_split_halves_sorted_classes() -> None:
    labels = np.array([7, -2, 100, 7, 3, 3])  # classes -2, 3 | 7, 100
    train, test = open_set_split(labels)
    assert set(labels[train].tolist()) == {-2, 3}
    assert set(labels[test].tolist()) == {7, 100}
    assert sorted(train.tolist() + test.tolist()) == list(range(6))


def test_open_set_split_odd_and_strings() -> None:
    train, test = open_set_split(["c", "a", "b"])
    assert train.tolist() == [1, 2] and test.tolist() == [0]
    with pytest.raises(ValueError, match="at least 2 classes"):
        open_set_split([4, 4])


def test_encode_labels() -> None:
    codes, classes = encode_labels(np.array(["10", "9", "10"]))
    assert codes.tolist() == [1, 0, 1] and classes.tolist() == [9, 10]
    with pytest.raises(ValueError, match="1-D"):
        encode_labels(np.zeros((2, 2)))


def test_array_dataset() -> None:
    ds = ArrayDataset(np.full((4, 2), 255, dtype=np.uint8), np.array([3, 3, 9, 9], np.int32))
    x, y = ds[2]
    assert x.dtype == torch.float32 and x.tolist() == [1.0, 1.0] and y == 9
    assert ds.labels.dtype == np.int64 and not ds.labels.flags.writeable
    assert ds.num_classes == 2 and len(ds) == 4
    with pytest.raises(ValueError, match="labels has 3 entries but inputs has 4 rows"):
        ArrayDataset(torch.zeros(4, 2), [0, 1, 2])
    with pytest.raises(ValueError, match="labels must be integers"):
        ArrayDataset(torch.zeros(2, 2), [0.5, 1.0])
    with pytest.raises(ValueError, match="1-D"):
        ArrayDataset(torch.zeros(2, 2), [[0, 1]])


def test_digits_open_set() -> None:
    train, test = load_digits("train"), load_digits("test")
    assert set(train.labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(test.labels.tolist()) == {5, 6, 7, 8, 9}
    image, _ = train[0]
    assert tuple(image.shape) == (1, 8, 8) and float(image.max()) <= 1.0


def test_transforms_keep_shape_and_are_seedable() -> None:
    image = torch.rand(3, 12, 10)
    for transform in (
        RandomShift(2),
        RandomHorizontalFlip(1.0),
        RandomAffine(15, 0.1, (0.8, 1.2)),
        Compose([RandomShift(1), Normalize([0.5] * 3, [0.25] * 3)]),
    ):
        assert transform(image).shape == image.shape, transform
    crop = RandomCrop(8, padding=1)(image)
    assert tuple(crop.shape) == (3, 8, 8)
    a = RandomAffine(generator=torch.Generator().manual_seed(1))(image)
    b = RandomAffine(generator=torch.Generator().manual_seed(1))(image)
    assert torch.equal(a, b)


def test_transform_semantics() -> None:
    image = torch.arange(6.0).reshape(1, 2, 3)
    assert torch.equal(RandomHorizontalFlip(1.0)(image), image.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(image), image)
    still = RandomAffine(0.0, 0.0, (1.0, 1.0))(torch.rand(1, 9, 9))
    assert still.shape == (1, 9, 9)
    dot = torch.zeros(1, 9, 9)
    dot[0, 4, 4] = 1.0
    assert torch.allclose(RandomAffine(0.0, 0.0, (1.0, 1.0))(dot), dot, atol=1e-5)
    shifted = RandomShift(3, generator=torch.Generator().manual_seed(0))(dot)
    assert float(shifted.sum()) == 1.0


def test_transform_errors() -> None:
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        RandomShift(1)(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="larger than the padded image"):
        RandomCrop(20)(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="p must be"):
        RandomHorizontalFlip(2.0)
    with pytest.raises(ValueError, match="scale"):
        RandomAffine(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize([0.0], [0.0])


def test_class_names_name_every_label_id() -> None:
    ds = ArrayDataset(torch.zeros(3, 2), [0, 2, 2])
    assert ds.class_names == ["0", "1", "2"]  # no names: the ids
    named = ArrayDataset(torch.zeros(3, 2), [0, 2, 2], class_names=["ant", "bee", "cat"])
    assert [named.class_names[label] for label in named.labels] == ["ant", "cat", "cat"]
    with pytest.raises(ValueError, match="class_names has 2 names"):
        ArrayDataset(torch.zeros(3, 2), [0, 2, 2], class_names=["ant", "bee"])
    digits = load_digits("test")
    assert digits.class_names == [str(d) for d in range(10)]
