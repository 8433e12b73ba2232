"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs on its own (a fresh namespace, the working directory a new empty folder).
A block that needs something the page sets up first (a trained run folder) is fenced
```py instead, says so on its page, and is run by the test of that page against the real
thing (tests/test_inference.py: README "After training", docs/inference.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page.relative_to(ROOT).as_posix(), number, code)
    for page in PAGES
    for number, code in enumerate(
        re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
    )
]


def test_pages_are_found():
    names = {page.name for page in PAGES}
    assert {"README.md", "labels.md", "metrics.md", "data.md"} <= names
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize(
    ("page", "number", "code"), BLOCKS, ids=[f"{page}-{number}" for page, number, _ in BLOCKS]
)
def test_python_block_runs(page, number, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page} block {number}", "exec"), {"__name__": "__main__"})
