"""deepmetric: deep metric learning for PyTorch.

After training, ``deepmetric.load_run("runs/x")`` loads a run for inference (see
`deepmetric.inference`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Run", "__version__", "load_run"]


def __getattr__(name: str) -> Any:
    """``load_run`` and ``Run``, imported on first use, so that importing a light module such
    as ``deepmetric.distances`` does not load the inference stack."""
    if name in ("Run", "load_run"):
        from deepmetric import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'deepmetric' has no attribute {name!r}")
