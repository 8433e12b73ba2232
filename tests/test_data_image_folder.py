"""ImageFolderDataset on tiny PNGs written to a temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric.data import DataError, ImageFolderDataset, ImageReadError, RandomShift, load_image


def _write_png(path: Path, value: int, size: tuple[int, int] = (6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for c, name in enumerate(["ant", "bee", "cat", "dog", "eel"]):
        for i in range(3):
            _write_png(tmp_path / name / f"{i}.png", 40 * c + i)
    _write_png(tmp_path / "cat" / "nested" / "deep.PNG", 7)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def test_classes_labels_and_items(folder: Path) -> None:
    ds = ImageFolderDataset(folder)
    assert ds.classes == ("ant", "bee", "cat", "dog", "eel")
    assert len(ds) == 16
    assert ds.labels.dtype == np.int64 and ds.labels.ndim == 1
    assert np.bincount(ds.labels).tolist() == [3, 3, 4, 3, 3]
    image, label = ds[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 5, 6)
    assert label == 0
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_grayscale_resize_and_transform(folder: Path) -> None:
    ds = ImageFolderDataset(folder, mode="L", size=(8, 4), transform=RandomShift(1))
    image, _ = ds[3]
    assert tuple(image.shape) == (1, 8, 4)
    square = ImageFolderDataset(folder, size=7)
    assert tuple(square[0][0].shape) == (3, 7, 7)


def test_open_set_split(folder: Path) -> None:
    train = ImageFolderDataset(folder, split="train")
    test = ImageFolderDataset(folder, split="test")
    assert set(train.labels.tolist()) == {0, 1, 2}
    assert set(test.labels.tolist()) == {3, 4}
    assert len(train) + len(test) == 16
    assert {p.parent.name for p in test.paths} == {"dog", "eel"}


def test_works_with_a_dataloader(folder: Path) -> None:
    loader = torch.utils.data.DataLoader(ImageFolderDataset(folder, size=5), batch_size=4)
    images, labels = next(iter(loader))
    assert tuple(images.shape) == (4, 3, 5, 5) and labels.dtype == torch.int64


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")


def test_empty_folder_names_path_and_fix(tmp_path: Path) -> None:
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no images") as error:
        ImageFolderDataset(tmp_path)
    assert str(tmp_path) in str(error.value)
    assert "<class name>/<image file>" in str(error.value)


def test_images_without_class_folders(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png", 1)
    with pytest.raises(ValueError, match="one sub-folder per class"):
        ImageFolderDataset(tmp_path)


def test_empty_class_folder_warns(folder: Path) -> None:
    (folder / "fox").mkdir()
    with pytest.warns(UserWarning, match="hold no images"):
        ds = ImageFolderDataset(folder)
    assert "fox" not in ds.classes


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_image_names_path(folder: Path) -> None:
    bad = folder / "bee" / "1.png"
    _write_png(bad, 9, size=(64, 64))
    _truncate(bad)
    ds = ImageFolderDataset(folder)
    index = ds.paths.index(bad)
    with pytest.raises(OSError, match="cannot read image") as error:
        ds[index]
    assert str(bad) in str(error.value)
    assert "replace or delete" in str(error.value)


def test_unreadable_image_found_by_verify(folder: Path) -> None:
    (folder / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg")
    _write_png(folder / "eel" / "cut.png", 3, size=(64, 64))
    _truncate(folder / "eel" / "cut.png")
    with pytest.raises(OSError, match="2 of 18 images") as error:
        ImageFolderDataset(folder, verify=True)
    assert "broken.jpg" in str(error.value) and "cut.png" in str(error.value)


def test_load_image_rejects_non_images(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"")
    with pytest.raises(OSError, match=str(path)):
        load_image(path)


def test_bad_arguments(folder: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        ImageFolderDataset(folder, mode="CMYK")
    with pytest.raises(ValueError, match="size"):
        ImageFolderDataset(folder, size=0)
    with pytest.raises(ValueError, match="split"):
        ImageFolderDataset(folder, split="val")


def test_class_names_are_the_folder_names(folder: Path) -> None:
    test = ImageFolderDataset(folder, split="test")
    assert test.class_names == ["ant", "bee", "cat", "dog", "eel"]
    assert sorted({test.class_names[label] for label in test.labels}) == ["dog", "eel"]


def test_errors_are_data_errors(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        ImageFolderDataset(tmp_path / "empty")
    bad = folder / "ant" / "0.png"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(ImageReadError, match=str(bad)) as error:
        load_image(bad)
    assert isinstance(error.value, OSError) and "\n" not in str(error.value)
