"""load_feature_table on temporary CSV, .npy and .npz files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from deepmetric.data import DataError, load_feature_table


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    lines = ["f1,f2,species,f3,part"]
    for i in range(12):
        species = ["wren", "crow", "jay", "owl"][i % 4]
        part = "train" if i < 8 else "test"
        lines.append(f"{i},{i * 0.5},{species},{-i},{part}")
    path = tmp_path / "table.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_all_columns(csv_file: Path) -> None:
    ds = load_feature_table(csv_file, label_column="species", split_column="part")
    assert ds.features.dtype == torch.float32
    assert tuple(ds.features.shape) == (12, 3)  # label and split columns are not features
    assert ds.feature_columns == ("f1", "f2", "f3")
    assert ds.classes.tolist() == ["crow", "jay", "owl", "wren"]
    assert ds.labels.tolist()[:4] == [3, 0, 1, 2]
    x, y = ds[1]
    assert x.tolist() == [1.0, 0.5, -1.0] and y == 0


def test_csv_open_set_split(csv_file: Path) -> None:
    columns = ["f1", "f2", "f3"]
    train = load_feature_table(csv_file, "species", split="train", feature_columns=columns)
    test = load_feature_table(csv_file, "species", split="test", feature_columns=columns)
    assert set(train.labels.tolist()) == {0, 1}  # crow, jay
    assert set(test.labels.tolist()) == {2, 3}  # owl, wren
    assert len(train) + len(test) == 12


def test_csv_split_column(csv_file: Path) -> None:
    test = load_feature_table(csv_file, label_column="species", split="test", split_column="part")
    assert len(test) == 4
    assert test.features[:, 0].tolist() == [8.0, 9.0, 10.0, 11.0]


def test_csv_text_column_is_reported(csv_file: Path) -> None:
    with pytest.raises(ValueError, match="'part' is not numeric.*feature_columns="):
        load_feature_table(csv_file, label_column="species")


def test_missing_label_column_names_path_and_fix(csv_file: Path) -> None:
    with pytest.raises(ValueError, match="label_column 'specis'") as error:
        load_feature_table(csv_file, label_column="specis", feature_columns=["f1"])
    message = str(error.value)
    assert str(csv_file) in message
    assert "did you mean 'species'" in message
    assert "pass label_column=" in message


def test_bad_split_values(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("x,label,split\n1,0,train\n2,1,validation\n")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_feature_table(path, split="train", split_column="split")


def test_integer_string_labels_sort_numerically(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("x,label\n" + "".join(f"{i},{lab}\n" for i, lab in enumerate([10, 9, 2])))
    ds = load_feature_table(path)
    assert ds.classes.tolist() == [2, 9, 10]
    assert ds.labels.tolist() == [2, 1, 0]


def test_nan_features_rejected(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("x,label\n1,0\nnan,1\n")
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_feature_table(path)


def test_ragged_csv(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("x,label\n1,0\n2\n")
    with pytest.raises(ValueError, match="line 3"):
        load_feature_table(path)


def test_npy_plain_array(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    rng = np.random.default_rng(0)
    table = np.concatenate([rng.normal(size=(10, 4)), np.arange(10)[:, None] % 5], axis=1)
    np.save(path, table)
    ds = load_feature_table(path, label_column=-1, split="test")
    assert tuple(ds.features.shape) == (4, 4)
    assert set(ds.labels.tolist()) == {3, 4}
    with pytest.raises(ValueError, match="no column names"):
        load_feature_table(path, label_column="label")


def test_npy_structured_array(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    table = np.zeros(6, dtype=[("a", "f4"), ("b", "f8"), ("cls", "i8")])
    table["cls"] = [5, 5, 7, 7, -3, -3]
    np.save(path, table)
    ds = load_feature_table(path, label_column="cls")
    assert ds.classes.tolist() == [-3, 5, 7]
    assert tuple(ds.features.shape) == (6, 2)
    with pytest.raises(ValueError, match="did you mean 'cls'"):
        load_feature_table(path, label_column="clss")


def test_npz_blocks(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    np.savez(path, features=np.ones((8, 16)), label=np.repeat(["a", "b"], 4))
    ds = load_feature_table(path, split="train")
    assert tuple(ds.features.shape) == (4, 16)
    assert ds.labels.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="label_column 'labels'.*did you mean 'label'"):
        load_feature_table(path, label_column="labels")


def test_float_labels_rejected(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    np.savez(path, features=np.ones((3, 2)), label=np.array([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match="not whole numbers"):
        load_feature_table(path)


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_feature_table(tmp_path / "none.csv")
    path = tmp_path / "t.xlsx"
    path.write_text("")
    with pytest.raises(ValueError, match="unknown table format"):
        load_feature_table(path)


HAS_PARQUET_READER = any(importlib.util.find_spec(m) is not None for m in ("pyarrow", "pandas"))


@pytest.mark.skipif(HAS_PARQUET_READER, reason="a Parquet reader is installed")
def test_parquet_without_reader_says_what_to_install(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_feature_table(path)


def test_column_of_vectors_is_a_feature_block(tmp_path: Path) -> None:
    from deepmetric.data.feature_table import _features

    column = np.empty(3, dtype=object)
    for i in range(3):
        column[i] = [float(i), 1.0]
    block = _features({"emb": column, "x": np.arange(3)}, tmp_path, ["emb", "x"])
    assert block.tolist() == [[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [2.0, 1.0, 2.0]]


def test_class_names_are_the_label_values(csv_file: Path) -> None:
    ds = load_feature_table(csv_file, label_column="species", split_column="part")
    assert ds.class_names == ["crow", "jay", "owl", "wren"]
    assert ds.class_names[ds[1][1]] == "crow"


def test_missing_label_column_and_damaged_files_are_data_errors(csv_file: Path, tmp_path) -> None:
    with pytest.raises(DataError, match=f"{csv_file}: label_column 'label' is not a column"):
        load_feature_table(csv_file)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.raises(DataError, match=f"{damaged}: cannot read the table"):
        load_feature_table(damaged)
