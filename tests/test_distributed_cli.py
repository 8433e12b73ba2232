"""`python -m deepmetric` and, under torchrun, `deepmetric train` on several processes."""

from __future__ import annotations

import subprocess
import sys


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "deepmetric", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: deepmetric train" in done.stdout
