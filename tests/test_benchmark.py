"""`deepmetric benchmark` on a tiny budget: the table, resuming, parallel processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deepmetric import benchmark
from deepmetric.benchmark import DEFAULT_RECIPES, parse_recipes, run_benchmark, summarise
from deepmetric.cli import main
from deepmetric.training.config import load_config
from deepmetric.training.errors import ConfigError

TINY = [
    "data.name=digits",
    "model.name=mlp",
    "model.hidden_dims=[16]",
    "model.embedding_dim=8",
    "train.epochs=1",
    "train.classes_per_batch=5",
    "train.samples_per_class=2",
    "train.batches_per_epoch=2",
    "train.threads=1",
    "eval.metrics=[recall@k, map@r, nmi]",
    "eval.before_training=false",
]

RECIPES = """\
- name: normalized-softmax
  loss.name: NormalizedSoftmaxLoss
  loss.params: {temperature: 0.1}
- name: triplet
  loss.name: TripletMarginLoss
  loss.params: {margin: 0.1}
  miner.name: BatchHardMiner
"""


def test_every_default_recipe_is_a_valid_config():
    recipes = parse_recipes(DEFAULT_RECIPES)
    assert len(recipes) >= 10 and benchmark.REFERENCE in [r.name for r in recipes]
    for recipe in recipes:
        load_config(overrides=recipe.overrides)  # names, params and miners all exist
    names = {load_config(overrides=r.overrides).loss.name for r in recipes}
    assert {
        "ContrastiveLoss",
        "TripletMarginLoss",
        "MultiSimilarityLoss",
        "ProxyAnchorLoss",
    } < names
    assert {"NormalizedSoftmaxLoss", "CosFaceLoss", "ArcFaceLoss", "AdditiveMarginLoss"} < names


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x", "non-empty list"),
        ("- loss.name: TripletMarginLoss", "with a name"),
        ("- name: a\n- name: a", "unique"),
        ("- name: a b", "letters"),
    ],
)
def test_bad_recipe_files_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipes(text)


def test_summary_statistics_from_hand_made_runs():
    recipes = parse_recipes("- name: normalized-softmax\n- name: other\n")
    runs = {}
    for name, maps in (("normalized-softmax", [0.5, 0.6]), ("other", [0.9, 0.9])):
        for seed, value in enumerate(maps):
            after = {"map@r": value, "recall@1": value, "nmi": value}
            selection = {"split": "val", "best": {"map@r": value - 0.1}}
            runs[name, seed] = {
                "after": after,
                "selection": selection,
                "split": "test",
                "train_seconds": 1.0,
            }
    results = summarise(recipes, [0, 1], runs)
    reference, other = results["rows"]
    assert reference["map@r"]["mean"] == pytest.approx(0.55)
    assert reference["map@r"]["std"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    noise = 2 * np.sqrt(reference["map@r"]["std"] ** 2 / 2)
    assert other["vs_reference"]["noise"] == pytest.approx(noise)
    assert other["vs_reference"]["difference"] == pytest.approx(0.35)
    assert other["vs_reference"]["exceeds_noise"] == (0.35 > noise)
    assert other["val_map@r"]["mean"] == pytest.approx(0.8)


def test_table_resume_and_interrupted_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text(RECIPES)
    args = ["benchmark", "--quiet", "--recipes", str(recipes), "--seeds", "0,1"]
    assert main([*args, "--out", str(out), *TINY]) == 0
    results = json.loads((out / "benchmark.json").read_text())
    assert [row["recipe"] for row in results["rows"]] == ["normalized-softmax", "triplet"]
    for row in results["rows"]:
        assert len(row["map@r"]["values"]) == 2 and 0 <= row["map@r"]["mean"] <= 1
        assert row["selection_split"] == "train"  # digits: too few classes to hold out
        assert row["test_split"] == "test"
    table = (out / "benchmark.md").read_text()
    assert "| normalized-softmax |" in table and "| triplet |" in table
    assert (out / "benchmark.png").stat().st_size > 0
    assert "test MAP@R" in capsys.readouterr().out

    # Again: every run is finished, none is trained.
    calls = []
    monkeypatch.setattr(benchmark, "train", lambda *a, **k: calls.append(a) or {})
    assert main([*args, "--out", str(out), *TINY]) == 0
    assert calls == []
    assert json.loads((out / "benchmark.json").read_text())["rows"] == results["rows"]
    monkeypatch.undo()

    # A run killed before it finished (no summary) is resumed; finished ones are kept.
    killed = out / "triplet" / "seed-1"
    (killed / "summary.json").unlink()
    kept = (out / "triplet" / "seed-0" / "metrics.jsonl").read_text()
    assert main([*args, "--out", str(out), *TINY]) == 0
    assert (killed / "summary.json").is_file()
    assert (out / "triplet" / "seed-0" / "metrics.jsonl").read_text() == kept
    again = json.loads((out / "benchmark.json").read_text())["rows"]
    assert [r["map@r"]["values"] for r in again] == [r["map@r"]["values"] for r in results["rows"]]


def test_parallel_jobs_give_the_serial_results(tmp_path):
    recipes = parse_recipes(RECIPES)
    serial = run_benchmark(recipes, [0], tmp_path / "a", overrides=TINY, say=lambda _: None)
    parallel = run_benchmark(
        recipes, [0], tmp_path / "b", overrides=TINY, jobs=2, say=lambda _: None
    )
    assert [r["map@r"] for r in serial["rows"]] == [r["map@r"] for r in parallel["rows"]]


def _children(pid: int) -> set[int]:
    """Ids of the live processes whose parent is ``pid`` (Linux /proc)."""
    children = set()
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")
def test_workers_stop_and_keep_their_work_when_the_benchmark_is_killed(tmp_path):
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text(RECIPES)
    out = tmp_path / "bench"
    endless = [*TINY, "train.batches_per_epoch=1000000", "train.checkpoint_every_steps=5"]
    command = [sys.executable, "-m", "deepmetric", "benchmark", "--quiet", "--jobs", "2"]
    command += ["--recipes", str(recipes), "--seeds", "0", "--out", str(out), *endless]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: set[int] = set()
    try:
        runs = [
            out / name / "seed-0" / "metrics.jsonl" for name in ("normalized-softmax", "triplet")
        ]
        _wait_for(lambda: all(run.is_file() for run in runs), 300, "both runs to start")
        workers = _children(parent.pid)
        assert len(workers) >= 2
        parent.send_signal(signal.SIGTERM)  # the parent dies at once; its workers must follow
        parent.wait(timeout=30)
        _wait_for(lambda: not any(_alive(pid) for pid in workers), 60, "the workers to stop")
        for run in runs:  # each worker saved its run as Ctrl-C would: resumable
            assert (run.parent / "checkpoints" / "last.pt").is_file()
    finally:
        for pid in [parent.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=30)
