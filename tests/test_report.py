"""The run report: every plot is written and report.html shows it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import deepmetric.report
from deepmetric.report import comparison_table, write_report


def _clusters(num_classes: int = 6, per_class: int = 10, dim: int = 8):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(num_classes, dim)) * 3
    labels = np.repeat(np.arange(num_classes) + 100, per_class)
    embeddings = centres[labels - 100] + rng.normal(size=(len(labels), dim))
    return embeddings.astype(np.float32), labels


HISTORY = [
    {"event": "eval", "epoch": 0, "step": 0, "recall@1": 0.4, "map@r": 0.1, "nmi": 0.3},
    {"event": "train", "epoch": 1, "step": 5, "loss": 2.0, "lr": 0.1},
    {"event": "train", "epoch": 1, "step": 10, "loss": 1.5, "lr": 0.1},
    {"event": "eval", "epoch": 1, "step": 10, "train_loss": 1.7, "recall@1": 0.8, "map@r": 0.5},
]
SUMMARY = {
    "before": {"recall@1": 0.4, "recall@2": 0.5, "map@r": 0.1},
    "after": {"num_queries": 60, "recall@1": 0.8, "recall@2": 0.9, "map@r": 0.5},
    "best_epoch": 1,
}


def test_report_with_images(tmp_path):
    embeddings, labels = _clusters()
    pictures = np.random.default_rng(1).random((len(labels), 1, 8, 8))
    path = write_report(
        tmp_path,
        history=HISTORY,
        summary=SUMMARY,
        embeddings=embeddings,
        labels=labels,
        images=lambda indices: pictures[indices],
        config_text="train:\n  epochs: 1\n",
        queries=3,
        neighbours=4,
    )
    page = path.read_text()
    names = ["training_curves", "recall_at_k", "distances", "embedding_map", "example_queries"]
    for name in names:
        png = tmp_path / "plots" / f"{name}.png"
        with Image.open(png) as image:
            assert image.size[0] > 300 and image.size[1] > 200
        assert f'src="plots/{name}.png"' in page
    assert "map@r" in page and "0.1000" in page and "0.5000" in page and "epochs: 1" in page


@pytest.mark.parametrize("projection", ["pca", "tsne"])
def test_report_of_vectors_has_no_example_grid(tmp_path, projection):
    embeddings, labels = _clusters()
    summary = {**SUMMARY, "before": None}
    write_report(
        tmp_path,
        history=HISTORY,
        summary=summary,
        embeddings=embeddings,
        labels=labels,
        images=lambda indices: None,
        distance="cosine",
        projection=projection,
    )
    assert not (tmp_path / "plots" / "example_queries.png").exists()
    assert (tmp_path / "plots" / "embedding_map.png").is_file()
    assert "before" not in (tmp_path / "report.html").read_text().split("<pre>")[1]


def test_comparison_table():
    text = comparison_table(SUMMARY["before"], SUMMARY["after"])
    assert text.splitlines()[0].split() == ["metric", "before", "after"]
    assert "num_queries" not in text
    assert "recall@1  0.4000  0.8000" in text
    assert comparison_table(None, {"map@r": 0.5}).splitlines()[0].split() == ["metric", "after"]


def test_report_shows_class_names(tmp_path):
    embeddings, labels = _clusters()  # labels 100..105
    names = [f"id{i}" for i in range(100)] + ["附", "亜", "唖", "娃", "阿", "哀"]
    pictures = np.random.default_rng(1).random((len(labels), 1, 8, 8))
    write_report(
        tmp_path,
        history=HISTORY,
        summary=SUMMARY,
        embeddings=embeddings,
        labels=labels,
        images=lambda indices: pictures[indices],
        class_names=names,
        queries=3,
        neighbours=4,
        map_classes=4,
    )
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    shown = page.split("embedding_map.png")[-1].split("</figure>")[0]
    assert sum(name in shown for name in names[100:]) == 4  # the map's classes, by name
    grid = page.split("example_queries.png")[-1].split("</table>")[0]
    assert grid.count("<tr><td>") == 3 and "id10" not in grid
    assert all(any(n in row for n in names[100:]) for row in grid.split("<tr><td>")[1:])


def test_class_name():
    assert deepmetric.report.class_name(np.int64(2), ["a", "b", "c"]) == "c"
    assert deepmetric.report.class_name(5, ["a"]) == "5"
