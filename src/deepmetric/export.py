"""Export a run's embedder to TorchScript or ONNX, checked against the PyTorch model.

The exported file maps a float32 batch ``(N, *input_shape)`` (images in [0, 1], as
`Run.prepare` makes them) to float32 embeddings ``(N, D)``, for any N; it needs torch
(TorchScript) or onnxruntime (ONNX), not deepmetric. Its metadata (``deepmetric.json`` in the
TorchScript archive, ``metadata_props`` of the ONNX model) records the input shape, image
mode, embedding width, distance and the check below.

Before the file is written, the export is checked: the exported model's embeddings of real
items of the run's index (up to ``check_items`` of them, spread over the index, and one item
alone to check another batch size) must equal the PyTorch model's (float32, eval mode) to
within ``tolerance`` (default 1e-4, absolute, per coordinate; measured differences are about
1e-7). A larger difference raises `ExportError` and writes nothing.

>>> import tempfile
>>> from deepmetric.inference import load_run
>>> from deepmetric.training import load_config, train
>>> folder = tempfile.mkdtemp() + "/run"
>>> config = load_config(overrides=[
...     "data.name=digits", "model.name=mlp", "model.hidden_dims=[32]", "train.epochs=1",
...     "train.classes_per_batch=5", "train.batches_per_epoch=2", "train.threads=1",
...     "eval.metrics=[map@r]", "report.enabled=false"])
>>> _ = train(config, folder, quiet=True)
>>> result = export_run(load_run(folder), "torchscript")
>>> result.path.name, result.max_abs_diff <= result.tolerance
('embedder.torchscript.pt', True)
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepmetric._validation import error_reason
from deepmetric.inference import Run

__all__ = ["FORMATS", "TOLERANCE", "ExportError", "ExportResult", "export_run"]

FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-4
"""Largest absolute difference allowed between exported and PyTorch embeddings."""
_FILE_NAMES = {"torchscript": "embedder.torchscript.pt", "onnx": "embedder.onnx"}
_ONNX_EXTRA = (
    "ONNX export needs the onnx extra: pip install 'deepmetric[onnx]' "
    "(onnx, onnxruntime and onnxscript)"
)


class ExportError(RuntimeError):
    """An export that cannot be made or that does not match the PyTorch model."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_run` wrote and how closely it matches the PyTorch model.

    Attributes:
        path: the exported file.
        format: "torchscript" or "onnx".
        max_abs_diff: the largest absolute difference between the exported model's and the
            PyTorch model's embeddings over the checked inputs.
        tolerance: the largest difference allowed.
        num_checked: how many real items were embedded by both.
        split: the data split the checked items came from.
    """

    path: Path
    format: str
    max_abs_diff: float
    tolerance: float
    num_checked: int
    split: str


def export_run(
    run: Run,
    format: str = "torchscript",
    out: str | Path | None = None,
    *,
    tolerance: float = TOLERANCE,
    check_items: int = 64,
) -> ExportResult:
    """Export the embedder of ``run`` to ``out`` and check it against the PyTorch model.

    Parameters:
        run: a run loaded with `deepmetric.load_run`.
        format: "torchscript" (``torch.jit.script``) or "onnx" (``torch.onnx.export``, needs
            the ``onnx`` extra).
        out: the file to write; default ``RUN/embedder.torchscript.pt`` or
            ``RUN/embedder.onnx``.
        tolerance: largest absolute difference of embeddings allowed (default 1e-4).
        check_items: how many items of the run's index to compare (at least 1).
    """
    from deepmetric.training.checkpoint import atomic_write
    from deepmetric.training.data import gather

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if isinstance(check_items, bool) or not isinstance(check_items, int) or check_items < 1:
        raise ValueError(f"check_items must be a positive integer, got {check_items!r}")
    if format == "onnx":
        _require_onnx()
    out = Path(out) if out is not None else run.root / _FILE_NAMES[format]
    model = copy.deepcopy(run.model).cpu().float().eval()

    try:
        items = run.items()
    except (OSError, ValueError) as error:  # the run's data moved, or the index is other data
        raise ExportError(f"the check needs the items of the run's index: {error}") from error
    rows = np.unique(np.linspace(0, len(items) - 1, min(check_items, len(items))).astype(int))
    inputs = gather(items, rows)
    with torch.inference_mode():
        expected = model(inputs).numpy()
    if run.takes_images:
        kind = f"{'grey' if run.input_shape[0] == 1 else 'RGB'} images in [0, 1]"
    else:
        kind = "feature rows"
    metadata = {
        "format_version": 1,
        "input_shape": list(run.input_shape),
        "input": f"float32 (N, {', '.join(map(str, run.input_shape))}): {kind}",
        "embedding_dim": int(expected.shape[1]),
        "distance": run.config.eval.distance,
        "run": str(run.root),
    }
    measured: dict[str, float] = {}

    def write(temp: str) -> None:
        if format == "torchscript":
            _export_torchscript(model, temp, metadata)
        else:
            _export_onnx(model, inputs, temp, metadata)
        outputs = _run_exported(format, temp, inputs)
        single = _run_exported(format, temp, inputs[:1])
        difference = max(
            float(np.abs(outputs - expected).max()), float(np.abs(single - expected[:1]).max())
        )
        measured["max_abs_diff"] = difference
        if not difference <= tolerance:
            raise ExportError(
                f"the {format} model's embeddings differ from the PyTorch model's by up to "
                f"{difference:.3g} on {len(rows)} items of {run.root} (tolerance {tolerance:g}); "
                "nothing was written"
            )

    atomic_write(out, write)
    return ExportResult(
        path=out,
        format=format,
        max_abs_diff=measured["max_abs_diff"],
        tolerance=tolerance,
        num_checked=len(rows),
        split=run.config.eval.split,
    )


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ExportError(f"{_ONNX_EXTRA} ({error})") from error


def _export_torchscript(model: nn.Module, path: str, metadata: dict[str, Any]) -> None:
    try:
        with _torchscript_deprecation_silenced():
            scripted = torch.jit.script(model)
    except Exception as error:  # the compiler raises many types; name the model and cause
        reason = error_reason(error)
        raise ExportError(
            f"torch.jit.script cannot compile {type(model).__name__} ({reason}): use --format onnx"
        ) from error
    files = {"deepmetric.json": json.dumps(metadata)}
    with _torchscript_deprecation_silenced():
        torch.jit.save(scripted, path, _extra_files=files)


@contextlib.contextmanager
def _torchscript_deprecation_silenced() -> Iterator[None]:
    """torch 2.13 marks torch.jit deprecated (docs/inference.md says so); TorchScript files
    are still what many deployments load, so the export does not warn on each call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.", DeprecationWarning)
        yield


def _export_onnx(
    model: nn.Module, example: torch.Tensor, path: str, metadata: dict[str, Any]
) -> None:
    import onnx

    batch = torch.export.Dim("batch")
    quiet = io.StringIO()
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # torch.onnx logs each skipped torchvision operator
    try:
        with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecations inside torch.export
            torch.onnx.export(
                model,
                (example,),
                path,
                input_names=["input"],
                output_names=["embeddings"],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                verbose=False,
            )
    except Exception as error:
        reason = error_reason(error)
        raise ExportError(
            f"torch.onnx.export failed on {type(model).__name__}: {reason}"
        ) from error
    finally:
        logger.setLevel(level)
    proto = onnx.load(path)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, path)


def _run_exported(format: str, path: str, inputs: torch.Tensor) -> np.ndarray:
    """The embeddings of ``inputs`` computed by the exported file, loaded afresh."""
    if format == "torchscript":
        with _torchscript_deprecation_silenced():
            loaded = torch.jit.load(path)
        with torch.inference_mode():
            return loaded(inputs).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs.numpy()})[0]
