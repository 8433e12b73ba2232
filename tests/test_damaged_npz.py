"""Every .npz reader turns a damaged archive into its own error naming the file.

The readers (a feature table, a run folder's embeddings.npz, an index file) catch one set of
errors, `deepmetric._validation.FILE_READ_ERRORS`. The case here is a compressed archive
whose first member's deflate stream is corrupt: numpy raises `zlib.error` for it, not an
OSError or a zipfile error.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from deepmetric.data import DataError, load_feature_table
from deepmetric.index import NeighbourIndex
from deepmetric.index_file import IndexFileError
from deepmetric.training.errors import RunFolderError
from deepmetric.training.run_folder import RunFolder


def _corrupt_first_member(path: Path) -> None:
    """Overwrite the first byte of the first member's deflate stream with 0xFF: a final
    block of the reserved type 3, which zlib refuses."""
    with zipfile.ZipFile(path) as archive:
        member = archive.infolist()[0]
    assert member.compress_type == zipfile.ZIP_DEFLATED
    data = bytearray(path.read_bytes())
    offset = member.header_offset  # the local header: 30 bytes, then name and extra field
    name_length, extra_length = struct.unpack("<HH", data[offset + 26 : offset + 30])
    data[offset + 30 + name_length + extra_length] = 0xFF
    path.write_bytes(bytes(data))


def _damaged(path: Path, **arrays: np.ndarray) -> Path:
    np.savez_compressed(path, **arrays)
    _corrupt_first_member(path)
    with pytest.raises(zlib.error), np.load(path, allow_pickle=False) as data:
        data[data.files[0]]
    return path


def _index_arrays(tmp_path: Path) -> dict[str, np.ndarray]:
    """The members of a valid flat index file."""
    index = NeighbourIndex(metric="l2", backend="torch")
    index.add(np.eye(3, dtype=np.float32), labels=np.arange(3))
    index.save(tmp_path / "valid.npz")
    with np.load(tmp_path / "valid.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def test_feature_table(tmp_path):
    features = np.arange(40, dtype=np.float32).reshape(10, 4)
    path = _damaged(tmp_path / "table.npz", features=features, label=np.arange(10) % 2)
    with pytest.raises(DataError, match=f"{path}: cannot read the table"):
        load_feature_table(path, label_column="label")


def test_run_folder_embeddings(tmp_path):
    embeddings = np.arange(40, dtype=np.float32).reshape(10, 4)
    _damaged(tmp_path / "embeddings.npz", embeddings=embeddings, labels=np.arange(10))
    with pytest.raises(RunFolderError, match="embeddings.npz is damaged"):
        RunFolder(tmp_path).load_embeddings()


def test_index_file(tmp_path):
    arrays = _index_arrays(tmp_path)
    path = _damaged(tmp_path / "index.npz", **arrays)
    with pytest.raises(IndexFileError, match="cannot be read"):
        NeighbourIndex.load(path)
