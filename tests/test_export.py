"""deepmetric export: TorchScript and ONNX files that match the PyTorch model and run
without deepmetric (checked in a subprocess that cannot import it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from deepmetric import export
from deepmetric.cli import main
from deepmetric.export import TOLERANCE, ExportError, export_run
from deepmetric.inference import Run, load_run
from deepmetric.training.data import gather

TINY = [
    "data.name=digits",
    "model.embedding_dim=16",
    "train.epochs=1",
    "train.classes_per_batch=5",
    "train.samples_per_class=4",
    "train.batches_per_epoch=3",
    "eval.metrics=[map@r]",
    "train.threads=1",
    "report.enabled=false",
]
MODELS = {
    "mlp": ["model.name=mlp", "model.hidden_dims=[32]"],
    "cnn": ["model.name=cnn", "model.channels=[8,16]"],
}

# Runs the exported file with deepmetric blocked: any import of it raises ImportError.
STANDALONE = r"""
import importlib.abc
import sys


class BlockDeepmetric(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "deepmetric":
            raise ImportError(f"{name} is blocked: the exported file must run without it")
        return None


sys.meta_path.insert(0, BlockDeepmetric())
try:
    import deepmetric  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("deepmetric could be imported")

import numpy as np

kind, model_path, inputs_path, outputs_path = sys.argv[1:]
inputs = np.load(inputs_path)
if kind == "torchscript":
    import torch

    model = torch.jit.load(model_path)
    outputs = model(torch.from_numpy(inputs)).detach().numpy()
else:
    import onnxruntime

    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": inputs})[0]
np.save(outputs_path, outputs)
print("deepmetric modules:", [m for m in sys.modules if m.split(".")[0] == "deepmetric"])
"""


def train(folder, model: str) -> Run:
    assert main(["train", "--quiet", "--run-dir", str(folder), *TINY, *MODELS[model]]) == 0
    return load_run(folder, device="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """The MLP run, which most tests use."""
    return train(tmp_path_factory.mktemp("export") / "mlp", "mlp")


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory) -> Run:
    return train(tmp_path_factory.mktemp("export") / "cnn", "cnn")


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_export_matches_pytorch_and_runs_without_deepmetric(request, model, kind, tmp_path, capsys):
    run = request.getfixturevalue("run" if model == "mlp" else "cnn_run")
    out = tmp_path / f"model.{kind}"
    code = main(["export", str(run.root), "--format", kind, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    difference = float(re.search(r"by at most (\S+) \(max abs difference", printed).group(1))
    assert 0 <= difference <= TOLERANCE

    items = run.items()  # real items, other than the ones the export checked
    inputs = gather(items, np.arange(1, len(items), 37)).numpy()
    np.save(tmp_path / "inputs.npy", inputs)
    outputs_path = tmp_path / "outputs.npy"
    command = [sys.executable, "-I", "-c", STANDALONE, kind, str(out), "inputs.npy", "outputs.npy"]
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "deepmetric modules: []" in done.stdout
    with torch.inference_mode():
        expected = run.model(torch.from_numpy(inputs)).numpy()
    outputs = np.load(outputs_path)
    assert outputs.shape == expected.shape == (len(inputs), 16)
    assert np.abs(outputs - expected).max() <= TOLERANCE


def test_exported_files_carry_their_metadata(run, tmp_path):
    result = export_run(run, "torchscript", tmp_path / "model.pt")
    assert result.format == "torchscript" and result.split == run.config.eval.split
    assert result.num_checked == 64
    with zipfile.ZipFile(result.path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("extra/deepmetric.json"))
        metadata = json.loads(archive.read(name))
    assert metadata["input_shape"] == [1, 8, 8] and metadata["embedding_dim"] == 16
    assert metadata["distance"] == "euclidean" and "grey images in [0, 1]" in metadata["input"]

    onnx = pytest.importorskip("onnx")
    result = export_run(run, "onnx", tmp_path / "model.onnx", check_items=5)
    assert result.num_checked == 5
    props = {p.key: json.loads(p.value) for p in onnx.load(result.path).metadata_props}
    assert props["input_shape"] == [1, 8, 8] and props["embedding_dim"] == 16


def test_default_file_is_in_the_run_folder(run):
    result = export_run(run, "torchscript")
    assert result.path == run.root / "embedder.torchscript.pt" and result.path.is_file()


def test_a_mismatch_beyond_the_tolerance_writes_nothing(run, tmp_path, monkeypatch):
    exported = export._run_exported

    def off_by_a_little(kind, path, inputs):
        return exported(kind, path, inputs) + 1e-3

    monkeypatch.setattr(export, "_run_exported", off_by_a_little)
    out = tmp_path / "model.pt"
    with pytest.raises(ExportError, match=r"differ .* by up to 0\.001.*tolerance 0\.0001"):
        export_run(run, "torchscript", out)
    assert not out.exists() and not list(tmp_path.iterdir())  # no temporary file left
    assert export_run(run, "torchscript", out, tolerance=2e-3).max_abs_diff >= 1e-3


def test_missing_onnx_extra_names_the_extra(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    with pytest.raises(ExportError, match=r"pip install 'deepmetric\[onnx\]'"):
        export_run(run, "onnx", tmp_path / "model.onnx")
    code = main(["export", str(run.root), "--format", "onnx", "--out", str(tmp_path / "m")])
    assert code == 2 and "deepmetric[onnx]" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_bad_arguments(run):
    with pytest.raises(ValueError, match="format must be one of"):
        export_run(run, "tflite")
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        export_run(run, "torchscript", tolerance=-1.0)
    with pytest.raises(ValueError, match="check_items must be a positive integer"):
        export_run(run, "torchscript", check_items=0)


def test_export_needs_the_runs_data(run, monkeypatch, tmp_path):
    def gone() -> None:
        raise FileNotFoundError("table.csv does not exist")

    monkeypatch.setattr(run, "items", gone)
    with pytest.raises(ExportError, match="the check needs the items .* table.csv does not"):
        export_run(run, "torchscript", tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


def test_export_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_a_compiler_error_without_a_message_is_named_by_its_type(run, tmp_path, monkeypatch):
    def fails_silently(model):
        raise RuntimeError("")

    monkeypatch.setattr(export.torch.jit, "script", fails_silently)
    with pytest.raises(ExportError, match=r"cannot compile .* \(RuntimeError\): use --format onnx"):
        export_run(run, "torchscript", tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
