"""The licence decisions of tools/build_kanji_fonts.py, on small DEP-5 copyright files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "build_kanji_fonts.py"

HEADER = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_kanji_fonts", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_kanji_fonts"] = module
    spec.loader.exec_module(module)
    return module


def _copyright(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "copyright"
    path.write_text(HEADER + body)
    return path


def test_jis_level1_has_2965_kanji(tool: ModuleType) -> None:
    chars = tool.jis_level1_kanji()
    assert len(chars) == 2965 and chars[0] == "亜" and chars[-1] == "腕"


def test_permissive_licence_with_text(tool: ModuleType, tmp_path: Path) -> None:
    path = _copyright(
        tmp_path,
        "Files: *\nCopyright: 2020 Someone\nLicense: OFL-1.1\n\n"
        "Files: debian/*\nCopyright: 2021 Packager\nLicense: GPL-2+\n\n"
        "License: OFL-1.1\n SIL OPEN FONT LICENSE\n .\n text\n",
    )
    lic = tool.decide_licence(path, Path("Face-Regular.ttf"))
    assert lic.allowed and lic.chosen == ("OFL-1.1",)
    assert lic.copyright == "2020 Someone"
    assert lic.texts["OFL-1.1"].startswith("SIL OPEN FONT LICENSE")


def test_gpl_font_is_excluded(tool: ModuleType, tmp_path: Path) -> None:
    path = _copyright(tmp_path, "Files: *.ttf\nCopyright: 2020 X\nLicense: GPL-3+\n")
    lic = tool.decide_licence(path, Path("a.ttf"))
    assert not lic.allowed and "copyleft" in lic.reason


def test_or_picks_an_allowed_alternative(tool: ModuleType, tmp_path: Path) -> None:
    path = _copyright(tmp_path, "Files: *\nCopyright: X\nLicense: CC-BY-SA-3.0 or OFL-1.1\n")
    lic = tool.decide_licence(path, Path("a.ttf"))
    assert lic.allowed and lic.chosen == ("OFL-1.1",)


def test_and_needs_every_part(tool: ModuleType, tmp_path: Path) -> None:
    path = _copyright(tmp_path, "Files: *\nCopyright: X\nLicense: MIT and GPL-2\n")
    assert not tool.decide_licence(path, Path("a.ttf")).allowed


def test_unknown_licence_is_unclear(tool: ModuleType, tmp_path: Path) -> None:
    path = _copyright(tmp_path, "Files: *\nCopyright: X\nLicense: Custom-Free-ish\n")
    lic = tool.decide_licence(path, Path("a.ttf"))
    assert not lic.allowed and "unclear" in lic.reason


def test_last_matching_paragraph_wins(tool: ModuleType, tmp_path: Path) -> None:
    path = _copyright(
        tmp_path,
        "Files: *\nCopyright: X\nLicense: GPL-2\n\nFiles: good-*.ttf\nCopyright: Y\nLicense: MIT\n",
    )
    assert tool.decide_licence(path, Path("good-1.ttf")).allowed
    assert not tool.decide_licence(path, Path("other.ttf")).allowed


def test_missing_or_free_form_copyright_is_unclear(tool: ModuleType, tmp_path: Path) -> None:
    assert not tool.decide_licence(tmp_path / "none", Path("a.ttf")).allowed
    free_form = tmp_path / "free"
    free_form.write_text("This font is free.\n")
    assert not tool.decide_licence(free_form, Path("a.ttf")).allowed


def test_place_centres_and_binarises(tool: ModuleType) -> None:
    crop = np.full((40, 20), 255, dtype=np.uint8)  # a solid bar, 2:1
    out = tool._place(crop, scale=0.5)
    assert out.shape == (32, 32) and out.dtype == bool
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    assert (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == (20, 10)
    assert rows[0] == 6 and cols[0] == 11  # centred
    huge = tool._place(np.full((400, 100), 255, dtype=np.uint8), scale=1.0)
    assert np.flatnonzero(huge.any(axis=1)).size == tool.MAX_BOX  # shrunk to fit


def test_raw_pixel_retrieval(tool: ModuleType) -> None:
    rows = np.array(
        [[1] * 8 + [0] * 8, [1] * 7 + [0] * 9, [0] * 8 + [1] * 8, [1] * 6 + [0] * 10],
        dtype=np.uint8,
    )
    bits = np.packbits(rows, axis=1)
    perfect = tool.raw_pixel_retrieval(bits[:3], np.array([0, 0, 1]))
    assert perfect["recall_at_1"] == pytest.approx(2 / 3, abs=1e-4)  # class 1: no positive
    mixed = tool.raw_pixel_retrieval(bits, np.array([0, 0, 1, 1]))
    # query 3 is nearest to query 1 (another class); query 1 is as near to 0 as to 3 and
    # ties go to the lower index, so only query 3 misses
    assert mixed["recall_at_1"] == pytest.approx(0.75)
