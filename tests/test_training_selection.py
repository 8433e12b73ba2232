"""Honest model selection: the validation classes, and a test split read once, at the end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepmetric.data import DataError
from deepmetric.training import distributed_run
from deepmetric.training.config import load_config
from deepmetric.training.data import load_split, validation_classes
from deepmetric.training.trainer import train


@pytest.fixture
def table(tmp_path):
    """20 classes of 6 points in 5-D: 10 training classes (2 held out) and 10 test classes."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 5)) * 3
    rows = np.concatenate(
        [
            np.repeat(centres, 6, 0) + rng.normal(size=(120, 5)),
            np.repeat(np.arange(20), 6)[:, None],
        ],
        1,
    )
    path = tmp_path / "table.npy"
    np.save(path, rows)
    return path


def config(table, *overrides):
    return load_config(
        overrides=[
            "data.name=feature_table",
            f"data.path={table}",
            "data.label_column=-1",
            "model.name=mlp",
            "model.hidden_dims=[16]",
            "model.embedding_dim=8",
            "train.epochs=3",
            "train.classes_per_batch=4",
            "train.samples_per_class=2",
            "train.batches_per_epoch=3",
            "train.threads=1",
            "eval.metrics=[recall@k, map@r]",
            "eval.k=[1, 2]",
            "eval.before_training=true",
            "report.enabled=false",
            *overrides,
        ]
    )


def classes(dataset):
    return set(np.unique(dataset.labels).tolist())


def test_validation_classes_are_disjoint_seeded_and_never_trained_on(table):
    data = config(table).data
    train_set, val_set, test_set = (load_split(data, s) for s in ("train", "val", "test"))
    assert validation_classes(data) == len(classes(val_set)) == 2
    assert len(classes(train_set)) == 8 and len(classes(test_set)) == 10
    assert not classes(train_set) & classes(val_set)
    assert not (classes(train_set) | classes(val_set)) & classes(test_set)
    assert classes(train_set) | classes(val_set) == set(range(10))  # the data's train split
    again = load_split(config(table).data, "val")
    assert classes(again) == classes(val_set)
    other = {
        frozenset(classes(load_split(config(table, f"data.seed={s}").data, "val")))
        for s in range(6)
    }
    assert len(other) > 1  # the draw follows data.seed
    everything = load_split(data, "all")
    assert classes(everything) == classes(train_set) | classes(val_set) | classes(test_set)


def test_no_validation_split_when_too_few_classes_are_held_out(table):
    data = config(table, "data.val_share=0.1").data  # 1 of 10 classes: none held out
    assert validation_classes(data) == 0
    assert len(classes(load_split(data, "train"))) == 10
    with pytest.raises(DataError, match="eval.select_split=train"):
        load_split(data, "val")


def _record_embedded(monkeypatch):
    """Every embedding call of the trainer: the classes it embedded and the step it ran at."""
    calls = []
    real = distributed_run.embed_sharded
    progress = {"step": 0}

    def spy(model, dataset, **kwargs):
        calls.append((progress["step"], classes(dataset)))
        return real(model, dataset, **kwargs)

    monkeypatch.setattr(distributed_run, "embed_sharded", spy)

    def on_step(state):
        progress["step"] = state.step

    return calls, on_step


def test_selection_never_embeds_the_test_split_before_the_end(table, tmp_path, monkeypatch):
    calls, on_step = _record_embedded(monkeypatch)
    run = tmp_path / "run"
    summary = train(config(table), run, quiet=True, on_step=on_step)
    test = classes(load_split(config(table).data, "test"))
    val = classes(load_split(config(table).data, "val"))
    steps = summary["steps"]
    assert steps == 9
    during = [embedded for step, embedded in calls[:-2]]  # before, 3 epochs
    assert len(during) == 4 and all(embedded == val for embedded in during)
    assert [c for _, c in calls[-2:]] == [test, test]  # untrained and chosen model, at the end
    assert all(step == steps for step, _ in calls[-2:])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records if r["event"] == "eval"} == {"val"}
    assert summary["split"] == "test" and summary["selection"]["split"] == "val"
    assert not summary["selection"]["reads_test"]
    best = [r for r in records if r["event"] == "eval" and r["epoch"] == summary["best_epoch"]]
    assert best[0]["map@r"] == summary["selection"]["best"]["map@r"]
    stored = np.load(run / "embeddings.npz")
    assert set(stored["labels"].tolist()) == test  # the index holds the test split
    assert summary["after"]["num_queries"] == 60


def test_selection_on_the_test_split_only_when_asked_and_flagged(table, tmp_path, monkeypatch):
    calls, on_step = _record_embedded(monkeypatch)
    summary = train(config(table, "eval.select_split=test"), tmp_path / "r", quiet=True)
    test = classes(load_split(config(table).data, "test"))
    assert all(embedded == test for _, embedded in calls)
    assert summary["selection"]["reads_test"] and summary["selection"]["split"] == "test"


def test_selection_falls_back_to_the_training_classes_without_a_validation_split(table, tmp_path):
    summary = train(config(table, "data.val_share=0"), tmp_path / "r", quiet=True)
    assert summary["selection"]["split"] == "train" and summary["selection"]["asked"] == "val"
    assert summary["train_classes"] == 10


def test_same_seed_same_selection(table, tmp_path):
    first = train(config(table), tmp_path / "a", quiet=True)
    second = train(config(table), tmp_path / "b", quiet=True)
    assert first["selection"] == second["selection"] and first["after"] == second["after"]
