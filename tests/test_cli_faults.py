"""Faults of the command line, in real processes.

A bad input (config key or value, data, a damaged or missing run folder file) ends the
command with one line on stderr that names the file or key and the fix, exit status 2, and
no run folder left behind; a run killed mid-write with a torn log resumes; a run without a
checkpoint is refused, then started again on request with its old log kept.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric.training.checkpoint import load_checkpoint
from deepmetric.training.config import load_config
from deepmetric.training.run_folder import RunFolder
from deepmetric.training.trainer import train

TINY = [
    "data.name=digits",
    "model.name=mlp",
    "model.hidden_dims=[32]",
    "model.embedding_dim=16",
    "train.epochs=1",
    "train.classes_per_batch=5",
    "train.samples_per_class=4",
    "train.batches_per_epoch=4",
    "eval.metrics=[recall@k, map@r]",
    "train.threads=1",
    "report.enabled=false",
]
TIMEOUT = 300  # seconds for one command, on a slow shared machine
COMMAND = [sys.executable, "-m", "deepmetric.cli"]


def _image_folder(root: Path, classes: int, images: int, size: int, mode: str = "L") -> Path:
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True)
        pattern = rng.random((size, size, 3)) * 255
        for i in range(images):
            noisy = np.clip(pattern + rng.normal(0, 20, pattern.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).convert(mode).save(folder / f"{i}.png")
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "run"
    train(load_config(overrides=TINY), folder, quiet=True)
    return folder


def _copy(run: Path, tmp: Path, name: str) -> Path:
    return Path(shutil.copytree(run, tmp / name))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, run) -> dict[str, tuple[subprocess.CompletedProcess, str, Path]]:
    """Each bad input's command, run in parallel: (result, what the line names, run folder
    that must not exist afterwards)."""
    tmp = tmp_path_factory.mktemp("bad")
    cases: dict[str, tuple[list[str], str]] = {}
    runs = tmp / "runs"

    def train_args(name: str, *overrides: str, options: tuple[str, ...] = ()) -> list[str]:
        folder = runs / re.sub(r"\W+", "-", name)
        return ["train", *options, "--quiet", "--run-dir", str(folder), *TINY, *overrides]

    images = ("train.classes_per_batch=2", "train.samples_per_class=2", "eval.k=[1, 2]")

    (tmp / "empty" / "a").mkdir(parents=True)
    name = "empty image folder"
    cases[name] = (
        train_args(name, "data.name=image_folder", f"data.path={tmp / 'empty'}", *images),
        str(tmp / "empty"),
    )
    first = _image_folder(tmp / "first", 4, 3, 8)
    _truncate(first / "class_00" / "0.png")  # the first item: read while building
    name = "truncated image (train)"
    cases[name] = (
        train_args(name, "data.name=image_folder", f"data.path={first}", *images),
        str(first / "class_00" / "0.png"),
    )
    late = _image_folder(tmp / "late", 4, 3, 8)
    # An item of the selection split (the 2 training classes: too few to hold validation
    # classes out), read in the evaluation before step 1; test items are read after training.
    _truncate(late / "class_01" / "2.png")
    name = "truncated image (evaluation)"
    cases[name] = (
        train_args(name, "data.name=image_folder", f"data.path={late}", *images),
        str(late / "class_01" / "2.png"),
    )
    table = tmp / "table.csv"
    rows = [f"{i % 3},{i % 5},bird{i % 4}" for i in range(24)]
    table.write_text("a,b,species\n" + "\n".join(rows) + "\n")
    name = "csv without label column"
    cases[name] = (
        train_args(name, "data.name=feature_table", f"data.path={table}"),
        f"{table}: label_column 'label' is not a column",
    )
    name = "unknown config key"
    cases[name] = (train_args(name, "train.epoch=3"), "did you mean 'train.epochs'")
    name = "distance the loss cannot use"
    cases[name] = (
        train_args(name, "loss.name=ArcFaceLoss", "loss.distance=EuclideanDistance"),
        "loss.distance=EuclideanDistance",
    )
    name = "missing config file"
    cases[name] = (
        train_args(name, options=("--config", str(tmp / "nope.yaml"))),
        str(tmp / "nope.yaml"),
    )

    damaged = _copy(run, tmp, "damaged_index")
    (damaged / "index.npz").write_bytes(b"not an index at all")
    cases["damaged index.npz"] = (
        ["search", str(damaged), "digits", "-k", "2", "--limit", "1"],
        str(damaged / "index.npz"),
    )
    truncated = _copy(run, tmp, "truncated_index")
    _truncate(truncated / "index.npz")
    cases["truncated index.npz"] = (
        ["search", str(truncated), "digits", "-k", "2", "--limit", "1"],
        str(truncated / "index.npz"),
    )
    embeddings = _copy(run, tmp, "damaged_embeddings")
    _truncate(embeddings / "embeddings.npz")
    cases["damaged embeddings.npz"] = (["report", str(embeddings)], str(embeddings))
    checkpoint = _copy(run, tmp, "damaged_checkpoint")
    _truncate(checkpoint / "checkpoints" / "best.pt")
    cases["damaged checkpoint"] = (
        ["evaluate", str(checkpoint)],
        str(checkpoint / "checkpoints" / "best.pt"),
    )
    cases["missing run folder"] = (["evaluate", str(tmp / "no-such-run")], "no-such-run")
    missing = _copy(run, tmp, "missing_checkpoint")
    (missing / "checkpoints" / "last.pt").unlink()
    cases["missing checkpoint"] = (
        ["train", "--resume", str(missing)],
        str(missing / "checkpoints" / "last.pt"),
    )

    processes = {
        name: subprocess.Popen([*COMMAND, *args], **_pipes()) for name, (args, _) in cases.items()
    }
    results = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=TIMEOUT)
        result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        results[name] = (result, cases[name][1], runs / re.sub(r"\W+", "-", name))
    return results


def _pipes() -> dict:
    return {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


CASES = [
    "empty image folder",
    "truncated image (train)",
    "truncated image (evaluation)",
    "csv without label column",
    "unknown config key",
    "distance the loss cannot use",
    "missing config file",
    "damaged index.npz",
    "truncated index.npz",
    "damaged embeddings.npz",
    "damaged checkpoint",
    "missing run folder",
    "missing checkpoint",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_file_and_exit_2(bad_inputs, case):
    result, named, run_dir = bad_inputs[case]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("deepmetric ") and ": error: " in lines[0]
    assert named in lines[0]
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # a run that failed before its first step leaves nothing


def test_missing_checkpoint_keeps_the_log_and_restarts_on_request(bad_inputs):
    result, _, _ = bad_inputs["missing checkpoint"]
    assert "--restart" in result.stderr
    run = Path(result.args[result.args.index("--resume") + 1])
    old_log = (run / "metrics.jsonl").read_text()
    assert old_log and RunFolder(run).history()  # refused without touching the log
    restarted = subprocess.run(
        [*COMMAND, "train", "--quiet", "--resume", str(run), "--restart"],
        timeout=TIMEOUT,
        **_pipes(),
    )
    assert restarted.returncode == 0, restarted.stderr
    assert (run / "metrics-1.jsonl").read_text() == old_log
    assert RunFolder(run).history()[0]["step"] <= 2  # the new log starts at step 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 4


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run(
        [*COMMAND, "evaluate", str(tmp_path / "nope"), "--debug"], timeout=TIMEOUT, **_pipes()
    )
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("deepmetric evaluate: error:")


def test_sigkill_then_torn_log_line_then_resume_ends_identically(tmp_path):
    overrides = [*TINY, "train.epochs=2", "train.batches_per_epoch=150"]
    overrides += ["train.checkpoint_every_steps=20", "train.log_every_steps=2"]
    reference = tmp_path / "reference"
    train(load_config(overrides=overrides), reference, quiet=True)

    run = tmp_path / "killed"
    process = subprocess.Popen(
        [*COMMAND, "train", "--quiet", "--run-dir", str(run), *overrides],
        stdout=subprocess.DEVNULL,
    )
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + TIMEOUT
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    process.kill()
    process.wait(timeout=TIMEOUT)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    with (run / "metrics.jsonl").open("a") as log:  # what a kill during a write leaves
        log.write('{"event": "train", "epoch": 2, "st')

    resumed = subprocess.run(
        [*COMMAND, "train", "--quiet", "--resume", str(run)], timeout=TIMEOUT, **_pipes()
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "torn last line" in resumed.stderr
    timing = ("samples_per_second", "seconds")
    history = [
        [{k: v for k, v in r.items() if k not in timing} for r in RunFolder(folder).history()]
        for folder in (reference, run)
    ]
    assert history[0] == history[1]
    summaries = [json.loads((f / "summary.json").read_text()) for f in (reference, run)]
    assert summaries[0]["after"] == summaries[1]["after"]
    for key, tensor in load_checkpoint(reference / "checkpoints" / "best.pt")["model"].items():
        assert torch.equal(tensor, load_checkpoint(run / "checkpoints" / "best.pt")["model"][key])


def test_yaml_example_of_the_docs_runs_as_written(tmp_path, monkeypatch):
    docs = (Path(__file__).parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    example = re.search(r"```yaml\n(.*?)```", docs, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path / "photos", 16, 6, 20, mode="RGB")
    (tmp_path / "my.yaml").write_text(example, encoding="utf-8")
    summary = train(load_config("my.yaml"), tmp_path / "runs" / "my-run", quiet=True)
    assert summary["after"]["num_queries"] == 8 * 6  # the 8 unseen classes
    assert json.loads((tmp_path / "runs" / "my-run" / "class_names.json").read_text()) == [
        f"class_{label:02d}" for label in range(16)
    ]
