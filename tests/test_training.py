"""The trainer, checkpoints and models: tiny runs on scikit-learn's digits.

The kill-and-resume tests run a job uninterrupted and again interrupted mid-epoch (a hard
kill that saves nothing, and a Ctrl-C that saves at the step boundary), resume it from its
last checkpoint, and require the same weights, metrics and log.
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric.models import ConvEmbedder, MLPEmbedder, build_model
from deepmetric.training.checkpoint import load_checkpoint, load_state, save_checkpoint
from deepmetric.training.config import load_config
from deepmetric.training.errors import CheckpointError, ConfigError
from deepmetric.training.run_folder import RunFolder
from deepmetric.training.trainer import TrainState, load_model, train

TINY = [
    "data.name=digits",
    "model.name=mlp",
    "model.hidden_dims=[32]",
    "model.embedding_dim=16",
    "train.epochs=1",
    "train.classes_per_batch=5",
    "train.samples_per_class=4",
    "train.batches_per_epoch=6",
    "train.log_every_steps=2",
    "eval.metrics=[recall@k, map@r]",
    "train.threads=1",  # tiny models gain nothing from more; shared CI machines lose a lot
    "eval.before_training=false",
    "report.enabled=false",
]


def tiny(*overrides: str):
    return load_config(overrides=[*TINY, *overrides])


# A job that uses every piece of state a checkpoint must carry: learnable class weights with
# their own learning rate, a cosine schedule with warm-up, dropout and random shifts (torch's
# generator), gradient clipping, two epochs, mid-epoch checkpoints every 3 steps.
RESUMABLE = (
    "train.epochs=2",
    "train.batches_per_epoch=8",
    "train.checkpoint_every_steps=3",
    "model.dropout=0.2",
    "data.augment_shift=1",
    "optimizer.warmup_steps=3",
    "optimizer.grad_clip_norm=0.5",
)


class Killed(Exception):
    """Stands for a hard kill: nothing is saved at the moment it happens."""


def _final_state(run: Path) -> tuple[dict, dict, list]:
    summary = json.loads((run / "summary.json").read_text())
    weights = {
        name: load_checkpoint(run / "checkpoints" / name)["model"]
        for name in ("best.pt", "last.pt")
    }
    timing = ("samples_per_second", "seconds")
    history = [
        {k: v for k, v in record.items() if k not in timing} for record in RunFolder(run).history()
    ]
    return summary, weights, history


def _assert_same_run(first: Path, second: Path) -> None:
    summary_a, weights_a, history_a = _final_state(first)
    summary_b, weights_b, history_b = _final_state(second)
    assert summary_a["after"] == summary_b["after"]
    assert summary_a["best_epoch"] == summary_b["best_epoch"]
    assert summary_a["steps"] == summary_b["steps"] == 16
    for name in weights_a:
        for key, tensor in weights_a[name].items():
            assert torch.equal(tensor, weights_b[name][key]), (name, key)
    assert history_a == history_b
    labels_a = np.load(first / "embeddings.npz")["embeddings"]
    assert np.array_equal(labels_a, np.load(second / "embeddings.npz")["embeddings"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "uninterrupted"
    train(tiny(*RESUMABLE), run, quiet=True)
    return run


@pytest.mark.parametrize("kill_at", [5, 11])
def test_hard_kill_mid_epoch_then_resume_ends_identically(tmp_path, uninterrupted, kill_at):
    run = tmp_path / "killed"

    def kill(state: TrainState) -> None:
        if state.step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        train(tiny(*RESUMABLE), run, quiet=True, on_step=kill)
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["state"]
    assert saved["step"] == kill_at // 3 * 3 and 0 < saved["batch"] < 8  # mid-epoch checkpoint
    train(tiny(*RESUMABLE), run, resume=True, quiet=True)
    _assert_same_run(uninterrupted, run)


def test_sigkill_of_a_real_process_then_resume_ends_identically(tmp_path):
    overrides = [*TINY, "train.epochs=2", "train.batches_per_epoch=150"]
    overrides += ["train.checkpoint_every_steps=20", "data.augment_shift=1"]
    reference = tmp_path / "reference"
    train(load_config(overrides=overrides), reference, quiet=True)

    run = tmp_path / "killed"
    command = [sys.executable, "-m", "deepmetric.cli", "train", "--quiet", "--run-dir", str(run)]
    process = subprocess.Popen([*command, *overrides])
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # kill at some moment between checkpoints, maybe during a write
    process.kill()  # SIGKILL: no handler runs, nothing is saved
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert load_checkpoint(last)["state"]["step"] < 300
    train(load_config(overrides=overrides), run, resume=True, quiet=True)
    after = json.loads((run / "summary.json").read_text())["after"]
    assert after == json.loads((reference / "summary.json").read_text())["after"]
    for name in ("best.pt", "last.pt"):
        for key, tensor in load_checkpoint(reference / "checkpoints" / name)["model"].items():
            assert torch.equal(tensor, load_checkpoint(run / "checkpoints" / name)["model"][key])
    assert not list(run.rglob("*.tmp"))


def test_ctrl_c_saves_at_the_step_and_resumes_identically(tmp_path, uninterrupted):
    run = tmp_path / "interrupted"

    def interrupt(state: TrainState) -> None:
        if state.step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(tiny(*RESUMABLE), run, quiet=True, on_step=interrupt)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 8
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    train(tiny(*RESUMABLE), run, resume=True, quiet=True)
    _assert_same_run(uninterrupted, run)


def test_run_folder_contents(tmp_path):
    run = tmp_path / "run"
    summary = train(tiny("eval.before_training=true"), run, quiet=True)
    names = {"config.yaml", "metrics.jsonl", "summary.json", "embeddings.npz", "index.npz"}
    assert names <= {p.name for p in run.iterdir()}
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.pt", "last.pt"}
    records = RunFolder(run).history()
    assert [r["event"] for r in records] == ["eval", "train", "train", "train", "eval"]
    assert records[0]["epoch"] == 0 and records[-1]["epoch"] == 1
    assert set(summary["before"]) == set(summary["after"]) >= {"recall@1", "map@r"}
    assert summary["steps"] == 6 and summary["best_epoch"] == 1
    assert load_config(base=RunFolder(run).read_config().to_dict()) == tiny(
        "eval.before_training=true"
    )
    data = np.load(run / "embeddings.npz")
    assert data["embeddings"].shape == (len(data["labels"]), 16)
    assert set(data["labels"].tolist()) == {5, 6, 7, 8, 9}
    if (run / "tensorboard").exists():
        assert any(
            p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir()
        )


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    first = train(tiny(), tmp_path / "a", quiet=True)
    second = train(tiny(), tmp_path / "b", quiet=True)
    third = train(tiny("train.seed=1"), tmp_path / "c", quiet=True)
    assert first["after"] == second["after"] != third["after"]


def test_loss_parameters_get_their_own_learning_rate(tmp_path):
    run = tmp_path / "run"
    train(tiny("optimizer.lr=0.001", "optimizer.loss_lr=0.05"), run, quiet=True)
    optimizer = load_checkpoint(run / "checkpoints" / "last.pt")["optimizer"]
    assert [group["initial_lr"] for group in optimizer["param_groups"]] == [0.001, 0.05]


def test_pair_loss_with_miner_from_config(tmp_path):
    config = tiny(
        "loss.name=TripletMarginLoss",
        "loss.params={margin: 0.2}",
        "loss.distance=CosineSimilarity",
        "miner.name=BatchHardMiner",
        "optimizer.schedule=constant",
    )
    summary = train(config, tmp_path / "run", quiet=True)
    assert 0 <= summary["after"]["map@r"] <= 1


def test_early_stopping(tmp_path):
    # num_skipped is 0 at every evaluation, so it never improves after the first one.
    config = tiny(
        "train.epochs=5", "train.early_stopping_patience=2", "eval.select_metric=num_skipped"
    )
    summary = train(config, tmp_path / "run", quiet=True)
    assert summary["steps"] == 3 * 6 and summary["best_epoch"] == 1


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", "bfloat16"), ("fp16", "float16")])
def test_mixed_precision_runs(tmp_path, precision, dtype):
    summary = train(tiny(f"train.precision={precision}"), tmp_path / "run", quiet=True)
    assert summary["precision"] == dtype
    assert np.isfinite(summary["after"]["map@r"])
    scaler = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["scaler"]
    assert bool(scaler) == (precision == "fp16")  # fp16 scales the loss, bf16 needs not


def test_resume_with_changed_config_names_the_keys(tmp_path):
    run = tmp_path / "run"
    train(tiny(), run, quiet=True)
    with pytest.raises(ConfigError, match=r"(?s)train\.epochs: 1 -> 2.*--resume"):
        train(tiny("train.epochs=2"), run, resume=True, quiet=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny(), run, quiet=True)


def test_more_classes_per_batch_than_classes(tmp_path):
    with pytest.raises(ConfigError, match="set train.classes_per_batch=5 or fewer"):
        train(tiny("train.classes_per_batch=6"), tmp_path / "run", quiet=True)


def test_image_folder_and_feature_table(tmp_path):
    rng = np.random.default_rng(0)
    patterns = rng.random((6, 12, 12)) > 0.5
    for label, pattern in enumerate(patterns):
        (tmp_path / "images" / f"class{label}").mkdir(parents=True)
        for i in range(4):
            noisy = pattern ^ (rng.random((12, 12)) > 0.9)
            Image.fromarray(noisy.astype(np.uint8) * 255).save(
                tmp_path / "images" / f"class{label}" / f"{i}.png"
            )
    images = tiny(
        "data.name=image_folder",
        f"data.path={tmp_path / 'images'}",
        "data.image_size=12",
        "model.name=cnn",
        "model.channels=[4, 8]",
        "train.classes_per_batch=3",
        "train.samples_per_class=2",
    )
    summary = train(images, tmp_path / "image_run", quiet=True)
    assert summary["after"]["num_queries"] == 12  # 3 unseen classes x 4 images

    table = tmp_path / "table.npy"
    features = np.concatenate([rng.normal(size=(40, 5)), np.repeat(np.arange(8), 5)[:, None]], 1)
    np.save(table, features)
    vectors = tiny(
        "data.name=feature_table",
        f"data.path={table}",
        "data.label_column=-1",
        "train.classes_per_batch=4",
        "train.samples_per_class=2",
    )
    summary = train(vectors, tmp_path / "table_run", quiet=True)
    assert summary["after"]["num_queries"] == 20


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    run = tmp_path / "run"
    train(tiny(), run, quiet=True)
    model, config, input_shape = load_model(run / "checkpoints" / "best.pt")
    assert config.model.embedding_dim == 16 and model.head.out_features == 16
    assert input_shape == (1, 8, 8)
    with pytest.raises(
        CheckpointError, match=r"head\.weight: checkpoint \(16, 32\), model \(8, 32\)"
    ):
        load_model(run / "checkpoints" / "best.pt", tiny("model.embedding_dim=8"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(run / "missing.pt")


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"weights": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"weights": torch.zeros(3), "bad": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["weights"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_load_state_lists_missing_and_unexpected_tensors():
    model = MLPEmbedder(4, 2, hidden_dims=())
    state = {"head.weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="(?s)head.bias: missing.*extra: not in the model"):
        load_state(model, state, "model", "test.pt")


def test_models_shapes_and_normalisation():
    cnn = ConvEmbedder(in_channels=1, embedding_dim=8, channels=(4, 8))
    out = cnn(torch.randn(3, 1, 32, 32))
    assert out.shape == (3, 8) and torch.allclose(out.norm(dim=1), torch.ones(3))
    mlp = build_model("mlp", (1, 8, 8), 5, hidden_dims=[7], normalize=False)
    assert mlp(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    with pytest.raises(ValueError, match="model.name=mlp"):
        build_model("cnn", (64,), 8)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        cnn(torch.randn(3, 32))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", (1, 8, 8), 8)


@pytest.mark.parametrize(
    "name", ["deepmetric.models", "deepmetric.training.config", "deepmetric.training"]
)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
