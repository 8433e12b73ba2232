"""The trainer, checkpoints and models: tiny runs on scikit-learn's digits.

The kill-and-resume tests run a job uninterrupted and again interrupted mid-epoch (a hard
kill that saves nothing, and a Ctrl-C that saves at the step boundary), resume it from its
last checkpoint, and require the same weights, metrics and log.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric.data import DataError
from deepmetric.models import ConvEmbedder, MLPEmbedder, build_model
from deepmetric.training.checkpoint import load_checkpoint, load_state, save_checkpoint
from deepmetric.training.components import build_loss
from deepmetric.training.config import load_config
from deepmetric.training.data import load_split
from deepmetric.training.errors import CheckpointError, ConfigError, RunFolderError
from deepmetric.training.run_folder import MetricsLog, RunFolder
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

    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background
    with pytest.raises(KeyboardInterrupt):
        train(tiny(*RESUMABLE), run, quiet=True, on_step=interrupt)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 8
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back
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


# Faults that must not lose work, and component filling that the user controls (issue 10).


def test_resume_without_checkpoint_is_refused_and_restart_keeps_the_log(tmp_path):
    run = tmp_path / "run"
    train(tiny(), run, quiet=True)
    (run / "checkpoints" / "last.pt").unlink()
    log = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"last\.pt is missing.*--restart"):
        train(tiny(), run, resume=True, quiet=True)
    assert (run / "metrics.jsonl").read_text() == log
    with pytest.raises(ConfigError, match="no checkpoint: start it again with .*--restart"):
        train(tiny(), run, quiet=True)
    summary = train(tiny(), run, resume=True, restart=True, quiet=True)
    assert summary["steps"] == 6
    assert (run / "metrics-1.jsonl").read_text() == log
    assert [r["step"] for r in RunFolder(run).history()] == [2, 4, 6, 6]


def test_torn_last_log_line_is_dropped_on_resume(tmp_path, uninterrupted):
    run = tmp_path / "killed"

    def kill(state: TrainState) -> None:
        if state.step == 11:
            raise Killed

    with pytest.raises(Killed):
        train(tiny(*RESUMABLE), run, quiet=True, on_step=kill)
    with (run / "metrics.jsonl").open("a") as log:
        log.write('{"event": "train", "epoch": 2, "step": 1')  # a kill during a write
    with pytest.warns(UserWarning, match="torn last line"):
        train(tiny(*RESUMABLE), run, resume=True, quiet=True)
    _assert_same_run(uninterrupted, run)


def test_damaged_log_line_before_the_last_names_the_line(tmp_path):
    folder = RunFolder(tmp_path)
    folder.metrics.write_text('{"event": "eval", "step": 0}\n{"event": "tr\n{"step": 2}\n')
    with pytest.raises(RunFolderError, match=r"metrics\.jsonl: line 2 is damaged"):
        folder.history()


def test_each_log_record_is_one_write_of_its_whole_line(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path)
    log = MetricsLog(folder)
    writes = []
    real_write = os.write

    def record_write(descriptor: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(descriptor, data)

    monkeypatch.setattr(os, "write", record_write)
    log.write({"event": "train", "epoch": 1, "step": 2, "loss": 0.5})
    log.write({"event": "train", "epoch": 1, "step": 4, "loss": 0.25})
    log.close()
    assert writes == folder.metrics.read_bytes().splitlines(keepends=True)
    assert [r["step"] for r in folder.history()] == [2, 4]


def test_optional_class_arguments_are_filled_only_on_request(tmp_path):
    assert build_loss("MarginLoss", {}, None, num_classes=5, embedding_dim=16).beta.shape == ()
    per_class = build_loss("MarginLoss", {"num_classes": "auto"}, None, 5, 16)
    assert per_class.beta.shape == (5,)
    assert build_loss("MarginLoss", {"num_classes": None}, None, 5, 16).beta.shape == ()
    proxies = build_loss("ProxyAnchorLoss", {}, None, 5, 16)  # required: always filled
    assert tuple(proxies.proxies.shape) == (5, 16)
    with pytest.raises(ConfigError, match="loss.params.num_classes=auto"):
        load_config(overrides=["loss.name=ArcFaceLoss", "loss.params.num_classes=null"])
    run = tmp_path / "run"
    train(
        tiny("loss.name=MarginLoss", "loss.params={num_classes: auto, learn_beta: true}"),
        run,
        quiet=True,
    )
    assert load_checkpoint(run / "checkpoints" / "last.pt")["loss"]["beta"].shape == (5,)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["loss.name=ArcFaceLoss", "loss.distance=EuclideanDistance"], "loss.distance"),
        (["loss.name=TripletMarginLoss", "loss.params.margin=-1"], "loss.params.margin"),
        (["loss.name=CosFaceLoss", "loss.params.scale=.nan"], "loss.params.scale"),
    ],
)
def test_values_a_component_refuses_are_config_errors_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(overrides=overrides)


def _images(root: Path, classes: int = 4, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for label in range(classes):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((8, 8)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{label}" / f"{i}.png")
    return root


IMAGES = (
    "data.name=image_folder",
    "train.classes_per_batch=2",
    "train.samples_per_class=2",
    "eval.k=[1, 2]",
)


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="has no images"):
        train(tiny(*IMAGES, f"data.path={tmp_path / 'empty'}"), tmp_path / "r1", quiet=True)
    assert not (tmp_path / "r1").exists()

    images = _images(tmp_path / "images")
    good = (images / "c1" / "1.png").read_bytes()  # a training class: the selection split
    (images / "c1" / "1.png").write_bytes(good[: len(good) // 2])  # read by the first evaluation
    config = tiny(*IMAGES, f"data.path={images}", "eval.before_training=true")
    with pytest.raises(DataError, match=re.escape(str(images / "c1" / "1.png"))):
        train(config, tmp_path / "runs" / "r2", quiet=True)  # runs/ made for it, removed too
    assert not (tmp_path / "runs").exists()
    (tmp_path / "r3" / "checkpoints").mkdir(parents=True)  # a folder the user made, with
    (tmp_path / "r3" / "checkpoints" / "mine.pt").write_text("theirs")  # files of their own
    with pytest.raises(DataError):
        train(config, tmp_path / "r3", quiet=True)
    assert [p.name for p in (tmp_path / "r3").rglob("*")] == ["checkpoints", "mine.pt"]
    (images / "c1" / "1.png").write_bytes(good)
    assert train(config, tmp_path / "runs" / "r2", quiet=True)["steps"] == 6  # the same again


def test_run_folder_keeps_the_class_names(tmp_path):
    run = tmp_path / "run"
    train(tiny(), run, quiet=True)
    assert json.loads((run / "class_names.json").read_text()) == [str(d) for d in range(10)]
    assert RunFolder(run).load_class_names() == [str(d) for d in range(10)]


def test_split_all_holds_the_train_and_test_draws():
    data = tiny("data.train_classes=2", "data.test_classes=3").data
    train_set, test_set, both = (load_split(data, split) for split in ("train", "test", "all"))
    assert set(np.unique(both.labels)) == set(np.unique(train_set.labels)) | set(
        np.unique(test_set.labels)
    )
    assert len(np.unique(both.labels)) == 5 and len(both) == len(train_set) + len(test_set)


@pytest.mark.parametrize(
    "model",
    [MLPEmbedder(64, 8, hidden_dims=(16,)), ConvEmbedder(1, 8, channels=(4, 8))],
    ids=["mlp", "cnn"],
)
def test_embedders_compile_with_torchscript(model):
    model.eval()
    scripted = torch.jit.script(model)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(scripted(x), model(x))
    if isinstance(model, ConvEmbedder):
        with pytest.raises(Exception, match=r"\(N, C, H, W\)"):
            scripted(torch.randn(3, 64))
