"""deepmetric.load_run: embed every kind of input as training did, search with class names.

Two tiny runs are trained once for the module: 8x8 digits (images, Euclidean distance) and a
CSV feature table with named classes (feature rows, cosine distance). Search results are
checked against a brute-force ranking of the run's stored embeddings.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import deepmetric
import deepmetric.inference
from deepmetric.cli import main
from deepmetric.data import load_image
from deepmetric.inference import Neighbour, Run, load_run
from deepmetric.training.data import gather

TINY = [
    "model.name=mlp",
    "model.hidden_dims=[32]",
    "model.embedding_dim=16",
    "train.epochs=1",
    "train.classes_per_batch=5",
    "train.samples_per_class=4",
    "train.batches_per_epoch=4",
    "eval.metrics=[map@r]",
    "train.threads=1",
    "report.enabled=false",
]
FRUITS = ["apple", "cherry", "date", "fig", "grape", "kiwi", "lemon", "mango", "olive", "pear"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Run:
    folder = tmp_path_factory.mktemp("inference") / "digits"
    assert main(["train", "--quiet", "--run-dir", str(folder), "data.name=digits", *TINY]) == 0
    return load_run(folder)


@pytest.fixture(scope="module")
def table_run(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("inference-table")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(FRUITS), 6))
    lines = ["f0,f1,f2,f3,f4,f5,fruit"]
    for row in range(len(FRUITS) * 12):
        values = centres[row % len(FRUITS)] + 0.3 * rng.normal(size=6)
        lines.append(",".join(f"{v:.5f}" for v in values) + f",{FRUITS[row % len(FRUITS)]}")
    table = root / "fruit.csv"
    table.write_text("\n".join(lines) + "\n")
    folder = root / "run"
    args = ["data.name=feature_table", f"data.path={table}", "data.label_column=fruit"]
    args += [*TINY, "eval.distance=cosine"]
    assert main(["train", "--quiet", "--run-dir", str(folder), *args]) == 0
    return load_run(folder)


def stored(run: Run) -> tuple[np.ndarray, np.ndarray]:
    with np.load(run.root / "embeddings.npz") as data:
        return data["embeddings"], data["labels"]


def brute_force(reference: np.ndarray, query: np.ndarray, distance: str) -> np.ndarray:
    """Distances from one query to every reference row, computed row by row."""
    out = np.empty(len(reference))
    for i, row in enumerate(reference.astype(np.float64)):
        q = query.astype(np.float64)
        if distance == "cosine":
            out[i] = 1.0 - row @ q / (np.linalg.norm(row) * np.linalg.norm(q))
        else:
            out[i] = np.sqrt(((row - q) ** 2).sum())
    return out


def test_load_run_exposes_model_config_names_and_index(digits_run):
    assert deepmetric.load_run is load_run and deepmetric.Run is Run
    assert not digits_run.model.training
    assert digits_run.config.data.name == "digits" and digits_run.input_shape == (1, 8, 8)
    assert digits_run.takes_images
    assert digits_run.class_names == [str(d) for d in range(10)]
    embeddings, labels = stored(digits_run)
    assert len(digits_run.index) == len(embeddings) == len(digits_run.items())
    assert np.array_equal(digits_run.item_labels, labels)


def test_embed_of_the_index_items_equals_the_stored_embeddings(digits_run):
    embeddings, _ = stored(digits_run)
    inputs = gather(digits_run.items(), np.arange(len(embeddings)))
    np.testing.assert_allclose(digits_run.embed(inputs), embeddings, atol=1e-5)
    np.testing.assert_allclose(  # batching is internal and does not change the result
        digits_run.embed(inputs[:50], batch_size=7), embeddings[:50], atol=1e-5
    )


def test_embed_runs_in_eval_mode_without_grad_and_restores_the_mode(digits_run):
    x = torch.rand(6, 1, 8, 8)
    expected = digits_run.embed(x)
    digits_run.model.train()
    try:
        again = digits_run.embed(x)  # BatchNorm in train mode would use the batch statistics
        assert digits_run.model.training
    finally:
        digits_run.model.eval()
    np.testing.assert_array_equal(again, expected)
    assert isinstance(expected, np.ndarray) and expected.dtype == np.float32


def test_embed_accepts_paths_pil_images_arrays_and_batches(digits_run, tmp_path):
    item = gather(digits_run.items(), [3])[0]  # (1, 8, 8) in [0, 1]
    pixels = np.rint(item[0].numpy() * 255).astype(np.uint8)
    path = tmp_path / "digit.png"
    Image.fromarray(pixels).save(path)
    quantised = torch.from_numpy(pixels)[None].float() / 255.0
    expected = digits_run.embed(quantised)
    assert expected.shape == (1, 16)
    np.testing.assert_allclose(digits_run.embed(str(path)), expected, atol=1e-6)
    np.testing.assert_allclose(digits_run.embed(path), expected, atol=1e-6)
    np.testing.assert_allclose(digits_run.embed(Image.open(path)), expected, atol=1e-6)
    np.testing.assert_allclose(digits_run.embed(pixels[None]), expected, atol=1e-6)  # uint8
    np.testing.assert_allclose(digits_run.embed(quantised.numpy()), expected, atol=1e-6)
    reversed_rows = np.repeat(quantised.numpy()[None], 2, axis=0)[::-1]  # negative strides
    np.testing.assert_allclose(
        digits_run.embed(reversed_rows), np.repeat(expected, 2, 0), atol=1e-6
    )
    mixed = digits_run.embed([path, quantised, pixels[None]])
    np.testing.assert_allclose(mixed, np.repeat(expected, 3, axis=0), atol=1e-6)
    # a larger RGB image is converted to grey and resized as load_image does
    big = tmp_path / "big.png"
    Image.fromarray(np.stack([np.kron(pixels, np.ones((4, 4), np.uint8))] * 3, -1)).save(big)
    grey = load_image(big, "L", (8, 8))
    np.testing.assert_allclose(digits_run.embed(big), digits_run.embed(grey), atol=1e-6)


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        (torch.rand(3, 8), ValueError, r"shape \(3, 8\) does not fit .* \(1, 8, 8\)"),
        (torch.full((1, 8, 8), float("nan")), ValueError, "NaN or inf"),
        ([], ValueError, "inputs is empty"),
        (torch.zeros(0, 1, 8, 8), ValueError, "inputs is empty"),
        (torch.zeros(1, 8, 8, dtype=torch.bool), TypeError, "real numbers"),
        ({"image": 1}, TypeError, "cannot embed a dict"),
        ([1.0, 2.0], ValueError, r"shape \(2,\) does not fit"),
    ],
)
def test_embed_rejects_bad_inputs_with_a_clear_message(digits_run, inputs, error, message):
    with pytest.raises(error, match=message):
        digits_run.embed(inputs)


def test_embed_of_a_missing_or_damaged_image_names_the_file(digits_run, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(OSError, match="broken.png"):
        digits_run.embed(broken)


def test_search_matches_a_brute_force_ranking_with_names(digits_run):
    embeddings, labels = stored(digits_run)
    rows = [0, 17, 400]
    inputs = gather(digits_run.items(), rows)
    found = digits_run.search(inputs, k=6)
    assert len(found) == 3
    for row, neighbours in zip(rows, found, strict=True):
        distances = brute_force(embeddings, embeddings[row], "euclidean")
        order = np.argsort(distances, kind="stable")[:6]
        assert all(isinstance(n, Neighbour) for n in neighbours)
        assert [n.rank for n in neighbours] == [1, 2, 3, 4, 5, 6]
        assert neighbours[0].distance == pytest.approx(0.0, abs=2e-3)  # the item itself
        assert {n.id for n in neighbours[1:]} == set(order[1:].tolist())
        for n in neighbours:
            assert n.distance == pytest.approx(distances[n.id], abs=2e-3)
            assert n.label == labels[n.id] and n.name == str(labels[n.id])


def test_search_items_leaves_the_query_out(digits_run):
    embeddings, _ = stored(digits_run)
    neighbours = digits_run.search_items([5], k=4)[0]
    distances = brute_force(embeddings, embeddings[5], "euclidean")
    distances[5] = np.inf
    assert [n.id for n in neighbours] == np.argsort(distances, kind="stable")[:4].tolist()
    assert all(n.id != 5 for n in neighbours)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, 10**6])
def test_search_rejects_k_out_of_range(digits_run, k):
    with pytest.raises(ValueError, match="k must be an integer from 1 to"):
        digits_run.search(torch.rand(1, 8, 8), k=k)


def test_search_items_rejects_unknown_ids(digits_run):
    with pytest.raises(ValueError, match="item id 100000 is not in the index"):
        digits_run.search_items([100000])
    with pytest.raises(ValueError, match="item id -1"):
        digits_run.search_items([-1])
    with pytest.raises(ValueError, match="1-D sequence of integer"):
        digits_run.search_items([[1, 2]])


def test_feature_rows_cosine_distance_and_class_names(table_run):
    assert table_run.input_shape == (6,) and not table_run.takes_images
    assert table_run.class_names == sorted(FRUITS)
    assert table_run.item_images([0]) is None
    embeddings, labels = stored(table_run)
    row = gather(table_run.items(), [2])[0].tolist()  # a feature row as a list of floats
    found = table_run.search(row, k=3)[0]
    distances = brute_force(embeddings, embeddings[2], "cosine")
    assert found[0].id == 2 and found[0].distance == pytest.approx(0.0, abs=1e-4)
    for n in found:
        assert n.distance == pytest.approx(distances[n.id], abs=1e-4)
        assert n.name == sorted(FRUITS)[labels[n.id]] and n.name in FRUITS
    np.testing.assert_allclose(table_run.embed([row, row]), table_run.embed(np.array([row] * 2)))
    with pytest.raises(ValueError, match="embeds feature rows of length 6, not images"):
        table_run.embed("picture.png")
    with pytest.raises(ValueError, match=r"shape \(5,\) does not fit"):
        table_run.embed([1.0, 2.0, 3.0, 4.0, 5.0])


def test_load_run_errors(tmp_path, digits_run):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="checkpoint must be 'best' or 'last'"):
        load_run(digits_run.root, checkpoint="newest")
    last = load_run(digits_run.root, checkpoint="last", device="cpu")
    assert last.device == torch.device("cpu")


ROOT = Path(__file__).parent.parent
README_SECTION = (
    (ROOT / "README.md").read_text(encoding="utf-8").split("## After training", 1)[1]
).split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def tour(tmp_path_factory) -> Path:
    """A folder holding runs/digits, trained by the README's command (made a few seconds
    long by extra overrides), and query.png, an 8x8 image."""
    folder = tmp_path_factory.mktemp("tour")
    train_line = next(
        line
        for line in re.findall(r"```bash\n(.*?)```", README_SECTION, re.S)[0].splitlines()
        if line.startswith("deepmetric train")
    )
    args = shlex.split(train_line.split("#")[0])[1:]
    args = [str(folder / a) if a == "runs/digits" else a for a in args]
    fast = ["train.epochs=1", "train.batches_per_epoch=4", "train.threads=1"]
    assert main([*args, *fast, "report.enabled=false", "--quiet"]) == 0
    pixels = np.zeros((8, 8), np.uint8)
    pixels[1:7, 3:5] = 255  # a "1"-like stroke: any 8x8 image is a query
    Image.fromarray(pixels).save(folder / "query.png")
    return folder


def test_readme_after_training_snippet_runs(tour, monkeypatch, capsys):
    snippet = re.findall(r"```py\n(.*?)```", README_SECTION, re.S)[0]
    assert len(snippet.strip().splitlines()) <= 6  # five lines of code and a blank line
    monkeypatch.chdir(tour)
    capsys.readouterr()
    exec(compile(snippet, "README.md After training", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    for rank, line in enumerate(lines, start=1):
        fields = line.split()
        assert fields[0] == str(rank) and fields[1] in {"5", "6", "7", "8", "9"}
        assert float(fields[2]) >= 0 and int(fields[3]) >= 0


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_docs_inference_examples_run(tour, monkeypatch, capsys):
    """docs/inference.md: its export commands print what it shows, its Python blocks run."""
    pytest.importorskip("onnxruntime", reason="the ONNX example needs the onnx extra")
    monkeypatch.chdir(tour)
    assert main(["export", "runs/digits"]) == 0
    assert main(["export", "runs/digits", "--format", "onnx"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "wrote runs/digits/embedder.torchscript.pt (torchscript)"
    assert printed[2] == "wrote runs/digits/embedder.onnx (onnx)"
    assert re.fullmatch(
        r"checked on 64 items of the test split: the embeddings differ from the PyTorch "
        r"model's by at most \S+ \(max abs difference; tolerance 0.0001\)",
        printed[3],
    )
    docs = (ROOT / "docs" / "inference.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```py\n(.*?)```", docs, re.S)
    assert len(blocks) == 3
    for number, block in enumerate(blocks):
        exec(compile(block, f"docs/inference.md block {number}", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([4, 64])" in out and "(4, 64)" in out
