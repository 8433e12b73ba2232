"""Checkpoints that are never half written, and loading that checks the model's shape.

`save_checkpoint` writes to a temporary file in the target's folder, flushes and fsyncs it,
then renames it over the target with `os.replace` (atomic on POSIX and Windows), so a crash
leaves either the old checkpoint or the new one. `load_state` refuses a checkpoint whose
tensors do not fit the module, naming each mismatched tensor and the fix.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepmetric._validation import error_reason
from deepmetric.training.errors import CheckpointError

__all__ = [
    "atomic_write",
    "get_rng_states",
    "load_checkpoint",
    "load_state",
    "save_checkpoint",
    "set_rng_states",
]


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(temp_path)`` on a temporary file beside ``path``, fsync it, then rename it
    over ``path``; readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temp_name, 0o666 & ~umask)  # as open() would create it, not mkstemp's 0o600
        write(temp_name)
        with open(temp_name, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` with ``torch.save`` to ``path`` atomically (temp file + rename)."""
    atomic_write(path, lambda temp: torch.save(state, temp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: train first (deepmetric train), or pass the run folder "
            "that holds checkpoints/"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = error_reason(error)[:200]
        if reason != type(error).__name__:
            reason = f"{type(error).__name__}: {reason}"
        raise CheckpointError(
            f"{path} is not a readable deepmetric checkpoint ({reason}): it is damaged or "
            "comes from another program; use a checkpoint "
            "that deepmetric train wrote, or delete the damaged file and train again"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path} is not a deepmetric checkpoint (it holds a {type(checkpoint).__name__}, "
            "not a dict of states): use the checkpoints/ of a deepmetric run folder"
        )
    return checkpoint


def load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: str) -> None:
    """``module.load_state_dict(state)``, after checking every name and shape.

    Raises `CheckpointError` listing the tensors that are missing, unexpected or of another
    shape, e.g. a checkpoint of a model with another embedding size.
    """
    expected = module.state_dict()
    problems = [
        f"{name}: checkpoint {tuple(state[name].shape)}, {what} {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state
        and isinstance(tensor, torch.Tensor)
        and isinstance(state[name], torch.Tensor)
        and state[name].shape != tensor.shape
    ]
    problems += [f"{name}: missing from the checkpoint" for name in expected if name not in state]
    problems += [f"{name}: not in the {what}" for name in state if name not in expected]
    if problems:
        shown = "; ".join(problems[:10]) + ("; ..." if len(problems) > 10 else "")
        raise CheckpointError(
            f"the checkpoint {source} does not fit the {what} (it comes from another model "
            f"shape: {shown}): build the {what} with the config the checkpoint was trained "
            "with (config.yaml of its run folder), or start a new run"
        )
    module.load_state_dict(state)


def get_rng_states() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global random generators (CPU and CUDA)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore the generators saved by `get_rng_states`."""
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    legacy = (kind, keys.numpy().astype(np.uint32), position, has_gauss, cached)
    np.random.set_state(legacy)  # noqa: NPY002 (the legacy generator user code may use)
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
