"""The `deepmetric` command line, run in-process on a tiny digits config."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepmetric.cli import main
from deepmetric.index import NeighbourIndex
from deepmetric.training.config import config_help

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
    "train.threads=1",  # tiny models gain nothing from more; shared CI machines lose a lot
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--quiet", "--run-dir", str(folder), *TINY, "report.enabled=false"]) == 0
    return folder


def test_train_prints_the_before_and_after_table(run, capsys, tmp_path):
    assert (run / "index.npz").is_file() and not (run / "report.html").exists()
    code = main(["train", "--run-dir", str(tmp_path / "again"), *TINY])
    out = capsys.readouterr().out
    assert code == 0
    assert "before training" in out
    header = next(
        line for line in out.splitlines() if line.startswith("metric") and "after" in line
    )
    assert header.split() == ["metric", "before", "after"]
    assert "map@r" in out and "best epoch 1" in out
    assert f"report: {tmp_path / 'again' / 'report.html'}" in out
    assert len(list((tmp_path / "again" / "plots").glob("*.png"))) == 5


def test_train_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("data.train_classes=null", "loss.name=NormalizedSoftmaxLoss", "train.epochs=2"):
        assert key in out
    assert "train.checkpoint_every_steps=" in out and "--resume" in out


def test_unknown_key_fails_with_a_suggestion(capsys, tmp_path):
    code = main(["train", "--run-dir", str(tmp_path / "r"), "train.epoch=3"])
    assert code == 2
    assert "did you mean 'train.epochs'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_resume_of_a_finished_run_and_of_a_changed_config(run, capsys):
    assert main(["train", "--quiet", "--resume", str(run)]) == 0
    assert "map@r" in capsys.readouterr().out
    assert main(["train", "--quiet", "--resume", str(run), "train.epochs=3"]) == 2
    assert "train.epochs: 1 -> 3" in capsys.readouterr().err


def test_evaluate(run, capsys):
    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    line = next(row for row in out.splitlines() if row.startswith("map@r"))
    assert float(line.split()[1]) == pytest.approx(summary["after"]["map@r"], abs=1e-4)
    assert main(["evaluate", str(run), "--split", "train", "--checkpoint", "last"]) == 0
    assert "num_queries  901" in capsys.readouterr().out


def test_embed_index_and_search(run, capsys, tmp_path):
    out = tmp_path / "digits.npz"
    assert main(["embed", str(run), "digits", "--split", "all", "--out", str(out)]) == 0
    data = np.load(out)
    assert data["embeddings"].shape == (1797, 16) and len(data["labels"]) == 1797

    index_path = tmp_path / "index.npz"
    assert main(["index", str(run), "digits", "--split", "test", "--out", str(index_path)]) == 0
    assert len(NeighbourIndex.load(index_path)) == 896
    capsys.readouterr()

    results = tmp_path / "found.json"
    args = ["search", str(run), "digits", "--index", str(index_path), "-k", "3", "--limit", "2"]
    assert main([*args, "--out", str(results)]) == 0
    found = json.loads(results.read_text())
    assert len(found) == 6 and [r["rank"] for r in found[:3]] == [1, 2, 3]
    assert found[0]["distance"] == pytest.approx(0.0, abs=1e-3)  # a query finds itself
    assert found[0]["label"] == found[0]["query_label"]
    assert "rank  index   label" in capsys.readouterr().out

    image = tmp_path / "query.png"
    Image.fromarray((np.eye(8) * 255).astype(np.uint8)).save(image)
    assert main(["search", str(run), str(image), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "query query.png" in out and out.count("\n") == 4


def test_report_command(run, capsys):
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and (run / "plots" / "example_queries.png").is_file()
    assert "report.html" in capsys.readouterr().out


def test_commands_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_sweep_temperature(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep-temperature", "--quiet", "--out", str(out), "--temperatures", "0.05,1"]
    assert main([*args, *TINY]) == 0
    table = (out / "sweep.md").read_text()
    # digits has 5 training classes, too few to hold out validation ones: selection on train
    header = "| temperature | train R@1 | train MAP@R | test R@1 | test MAP@R |"
    assert table.splitlines()[0] == header
    assert table.splitlines()[2].startswith("| 0.05") and table.splitlines()[3].startswith("| 1")
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["temperature"] for r in rows] == [0.05, 1.0]
    assert [r["selection_split"] for r in rows] == ["train", "train"]
    best = max(rows, key=lambda r: r["selection"]["map@r"])  # chosen without the test columns
    assert [r["chosen"] for r in rows] == [r is best for r in rows]
    assert table.count("(chosen)") == 1
    assert table in capsys.readouterr().out
    steps = (out / "temperature-1" / "metrics.jsonl").read_text()
    assert main([*args, *TINY]) == 0  # finished runs are reused, not retrained
    assert (out / "sweep.md").read_text() == table
    assert (out / "temperature-1" / "metrics.jsonl").read_text() == steps
    assert main([*args, *TINY, "train.epochs=2"]) == 2  # another config: not mixed in
    assert "its config changed" in capsys.readouterr().err


def test_console_script_is_main():
    (script,) = entry_points(group="console_scripts", name="deepmetric")
    assert script.load() is main


def test_docs_list_every_config_key_with_its_default():
    docs = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    lines = config_help().splitlines()
    keys = [line.strip() for line in lines if line.startswith("  ") and line[2] != " "]
    assert len(keys) == 58  # 55 before data.val_share, eval.select_split, warmup_ratio
    for entry in keys:
        key, default = entry.split("=", 1)
        assert f"| `{key}` | `{default}` |" in docs, entry


def test_search_queries_the_items_of_the_index_by_name(tmp_path, capsys):
    folder = tmp_path / "run"
    args = ["train", "--quiet", "--run-dir", str(folder), *TINY, "report.enabled=false"]
    assert main([*args, "data.test_classes=3"]) == 0
    names = json.loads((folder / "class_names.json").read_text())
    assert names == [str(digit) for digit in range(10)]
    indexed = np.load(folder / "embeddings.npz")["labels"]
    assert len(np.unique(indexed)) == 3  # the run's sample of the 5 test digits
    results = tmp_path / "found.json"
    search = ["search", str(folder), "digits", "--split", "test", "-k", "3", "--limit", "8"]
    assert main([*search, "--out", str(results)]) == 0
    found = json.loads(results.read_text())
    assert len(found) == 24 and set(r["query_label"] for r in found) <= set(indexed.tolist())
    assert all(r["index"] != int(r["query"][1:]) for r in found)  # never the query itself
    assert all(r["name"] == names[r["label"]] for r in found)
    first = [r for r in found if r["rank"] == 1]
    assert sum(r["label"] == r["query_label"] for r in first) >= 6  # digits are easy
    out = capsys.readouterr().out
    assert f"(label {first[0]['query_name']})" in out

    assert main(["search", str(folder), "digits", "--split", "train", "--limit", "1"]) == 0
    assert "none of its classes" in capsys.readouterr().err


def test_feature_table_classes_are_shown_by_name(tmp_path, capsys):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 4)) * 4
    rows = [
        ",".join(f"{v:.4f}" for v in centres[c] + rng.normal(size=4)) + f",cls{20 + c}"
        for c in range(8)
        for _ in range(6)
    ]
    table = tmp_path / "table.csv"
    table.write_text("a,b,c,d,species\n" + "\n".join(rows) + "\n")
    folder = tmp_path / "run"
    overrides = [
        *TINY,
        "data.name=feature_table",
        f"data.path={table}",
        "data.label_column=species",
        "train.classes_per_batch=4",
        "train.samples_per_class=2",
        "eval.k=[1, 2]",
        "report.enabled=false",
    ]
    assert main(["train", "--quiet", "--run-dir", str(folder), *overrides]) == 0
    assert json.loads((folder / "class_names.json").read_text()) == [
        f"cls{20 + c}" for c in range(8)
    ]
    capsys.readouterr()
    assert main(["search", str(folder), str(table), "-k", "2", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "(label cls2" in out and out.count("  cls2") == 4


def test_index_and_embed_do_not_overwrite_without_force(run, capsys):
    own = (run / "index.npz").read_bytes()
    assert main(["index", str(run), "digits", "--out", str(run / "index.npz")]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (run / "index.npz").read_bytes() == own
    assert main(["index", str(run), "digits"]) == 0  # the run's items: as its own index
    written = run / "index-digits-test.npz"
    assert len(NeighbourIndex.load(written)) == len(NeighbourIndex.load(run / "index.npz"))
    assert json.loads((run / "index-digits-test.class_names.json").read_text())[5] == "5"
    assert main(["index", str(run), "digits"]) == 2
    assert main(["index", str(run), "digits", "--force"]) == 0
    assert main(["embed", str(run), "digits"]) == 0
    data = np.load(run / "embeddings-digits-test.npz")
    assert data["class_names"].tolist() == [str(digit) for digit in range(10)]
    assert main(["embed", str(run), "digits"]) == 2


def test_evaluate_names_the_classes(run, capsys):
    assert main(["evaluate", str(run)]) == 0
    assert "896 items of 5 classes: 5, 6, 7, 8, 9" in capsys.readouterr().out


def test_report_of_an_unfinished_run_says_how_to_finish_it(run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["report", str(unfinished)]) == 2
    assert "summary.json is missing" in capsys.readouterr().err
