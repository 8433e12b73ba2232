"""The report of a training run: PNG plots and one report.html that shows them.

Plots: training curves (loss per step, metrics per epoch), the Recall@K curve before and
after training, histograms of positive and negative pair distances, a 2-D map of the
embeddings (PCA or t-SNE from scikit-learn) and a grid of example queries with their
nearest neighbours (for image data). Matplotlib draws with the Agg backend, so no display
is needed.

Classes are shown by name (``class_names[label]``: a kanji, a folder name). The page lists
the names of the map's classes and of the grid's queries and neighbours as text; the plots
draw a name where an installed font has its glyphs and the label id (``#12``) otherwise
(matplotlib's own fonts have no kanji).
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from deepmetric.index import NeighbourIndex  # noqa: E402
from deepmetric.metrics import evaluate  # noqa: E402
from deepmetric.metrics.verification import sample_pairs  # noqa: E402

__all__ = ["class_name", "comparison_table", "write_report"]

ImageSource = Callable[[np.ndarray], "np.ndarray | None"]
"""Maps item indices to (n, C, H, W) images in [0, 1], or None when the items are not images."""

COUNTS = ("num_queries", "num_skipped")


def class_name(label: object, class_names: Sequence[str] | None) -> str:
    """The name of label id ``label``, or ``str(label)`` where there is none.

    >>> class_name(1, ["cat", "dog"]), class_name(7, None)
    ('dog', '7')
    """
    index = int(label)  # type: ignore[call-overload]
    if class_names is not None and 0 <= index < len(class_names):
        return class_names[index]
    return str(label)


@functools.lru_cache(maxsize=1)
def _font_charmaps() -> tuple[tuple[str, frozenset[int]], ...]:
    """The installed fonts that matplotlib knows, with the code points each can draw."""
    fonts = []
    for entry in font_manager.fontManager.ttflist:
        try:
            fonts.append((entry.name, frozenset(FT2Font(entry.fname).get_charmap())))
        except (OSError, RuntimeError, ValueError):
            continue
    return tuple(fonts)


def _drawable(text: str) -> tuple[bool, str | None]:
    """Whether an installed font draws every character of ``text``, and which one."""
    wanted = {ord(c) for c in text if not c.isspace()}
    if all(c < 0x250 for c in wanted):
        return True, None  # Latin: matplotlib's default font
    for name, charmap in _font_charmaps():
        if wanted <= charmap:
            return True, name
    return False, None


def _plot_label(label: object, class_names: Sequence[str] | None) -> tuple[str, str | None]:
    """The text a plot shows for a class, and the font family to draw it with (None: the
    default): its name where a font has the glyphs, else ``#<label id>``."""
    name = class_name(label, class_names)
    drawable, family = _drawable(name)
    return (name, family) if drawable else (f"#{label}", None)


def comparison_table(before: Mapping[str, float] | None, after: Mapping[str, float]) -> str:
    """A plain-text table of metrics before and after training, one metric per row.

    Example:
        >>> print(comparison_table({"map@r": 0.25}, {"map@r": 0.5}))
        metric  before  after
        ------  ------  ------
        map@r   0.2500  0.5000
    """
    rows = [("metric", "before", "after")]
    for name, value in after.items():
        if name in COUNTS:
            continue
        old = "" if before is None or name not in before else f"{before[name]:.4f}"
        rows.append((name, old, f"{value:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    if before is None:
        rows, widths = [(r[0], r[2]) for r in rows], [widths[0], widths[2]]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _plot_training_curves(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    steps = [r for r in history if r["event"] == "train"]
    evals = [r for r in history if r["event"] == "eval"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        left.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="loss (steps)")
    trained = [r for r in evals if "train_loss" in r]
    if trained:
        left.plot(
            [r["step"] for r in trained],
            [r["train_loss"] for r in trained],
            "o-",
            label="epoch mean",
        )
    left.set(xlabel="step", ylabel="training loss", title="Training loss")
    left.legend()
    for name in ("map@r", "recall@1", "r_precision", "nmi"):
        points = [(r["epoch"], r[name]) for r in evals if name in r]
        if points:
            right.plot(*zip(*points, strict=True), "o-", label=name)
    splits = sorted({str(r["split"]) for r in evals if "split" in r})
    title = f"Evaluation ({', '.join(splits)} split)" if splits else "Evaluation"
    right.set(xlabel="epoch (0: before training)", ylabel="score", title=title, ylim=(0, 1))
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _recall_curve(embeddings: np.ndarray, labels: np.ndarray, distance: str) -> dict[int, float]:
    counts = np.unique(labels, return_counts=True)[1]
    largest = min(64, len(labels) - 1, 2 ** int(math.log2(max(1, counts.max() * 2))))
    ks = [2**i for i in range(int(math.log2(max(1, largest))) + 1)]
    scores = evaluate(embeddings, labels, metrics=["recall@k"], k=ks, distance=distance)
    return {k: scores[f"recall@{k}"] for k in ks}


def _plot_recall_at_k(
    curve: Mapping[int, float], before: Mapping[str, float] | None, path: Path
) -> None:
    figure, axes = plt.subplots(figsize=(5.5, 4))
    axes.plot(list(curve), list(curve.values()), "o-", label="after training")
    if before:
        old = {int(k.split("@")[1]): v for k, v in before.items() if k.startswith("recall@")}
        axes.plot(list(old), list(old.values()), "s--", label="before training")
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(curve), [str(k) for k in curve])
    axes.set(xlabel="K", ylabel="Recall@K", title="Recall@K", ylim=(0, 1.02))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _pair_distances(
    embeddings: np.ndarray, labels: np.ndarray, distance: str, num_pairs: int = 20_000
) -> tuple[np.ndarray, np.ndarray]:
    codes = np.unique(labels, return_inverse=True)[1].astype(np.int64)
    first, second, same = sample_pairs(codes, codes, num_pairs, seed=0, exclude_self=True)
    a, b = embeddings[first], embeddings[second]
    if distance == "cosine":
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        values = 1.0 - cos
    else:
        values = np.linalg.norm(a - b, axis=1)
    return values[same], values[~same]


def _plot_distances(positive: np.ndarray, negative: np.ndarray, distance: str, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    edges = np.linspace(0, max(positive.max(initial=0), negative.max(initial=0)) * 1.02, 61)
    axes.hist(negative, bins=edges, alpha=0.6, density=True, label=f"negative ({len(negative)})")
    axes.hist(positive, bins=edges, alpha=0.6, density=True, label=f"positive ({len(positive)})")
    label = "1 - cosine similarity" if distance == "cosine" else "Euclidean distance"
    axes.set(xlabel=label, ylabel="density", title="Distances of same- and other-class pairs")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _map_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The classes the 2-D map shows, drawn at random (seeded)."""
    classes = np.unique(labels)
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(classes, min(num_classes, len(classes)), replace=False))


def _plot_map(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    projection: str,
    path: Path,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """The 2-D map of the embeddings of a few classes; return the classes shown."""
    shown = _map_classes(labels, num_classes)
    rows = np.flatnonzero(np.isin(labels, shown))
    points = embeddings[rows]
    if projection == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, len(rows) // 4)))
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(points)
    else:
        from sklearn.decomposition import PCA

        xy = PCA(2, random_state=0).fit_transform(points)
    figure, axes = plt.subplots(figsize=(6, 5.5))
    colours = plt.get_cmap("tab20")
    families = set()
    for i, label in enumerate(shown):
        mine = labels[rows] == label
        text, family = _plot_label(label, class_names)
        families.add(family)
        axes.scatter(xy[mine, 0], xy[mine, 1], s=12, color=colours(i % 20), label=text)
    axes.set(title=f"{projection.upper()} of the embeddings, {len(shown)} classes")
    axes.set_xticks([])
    axes.set_yticks([])
    if len(shown) <= 20:
        fallback = [f for f in families if f is not None]
        font = {"family": [*plt.rcParams["font.family"], *fallback], "size": 7}
        axes.legend(markerscale=1.2, ncol=2, title="class", title_fontsize=8, prop=font)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return shown


def _plot_queries(
    embeddings: np.ndarray,
    labels: np.ndarray,
    images: ImageSource,
    num_queries: int,
    num_neighbours: int,
    distance: str,
    path: Path,
    class_names: Sequence[str] | None = None,
) -> list[tuple[str, list[tuple[str, float]]]] | None:
    """The grid of example queries; return each query's class name with its neighbours'
    names and distances, or None (nothing drawn) when the items are not images."""
    if distance == "cosine":
        embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    queries = np.sort(rng.choice(len(labels), min(num_queries, len(labels)), replace=False))
    k = min(num_neighbours, len(labels) - 1)
    index = NeighbourIndex(metric="l2")
    index.add(embeddings, labels=labels)
    found = index.search(embeddings[queries], k, exclude=queries)
    pictures = images(np.concatenate([queries[:, None], found.indices], axis=1).reshape(-1))
    if pictures is None:
        return None
    distances = np.sqrt(np.maximum(found.distances.astype(np.float64), 0.0))
    listed = [
        (
            class_name(labels[query], class_names),
            [
                (class_name(found.labels[row, col], class_names), float(distances[row, col]))
                for col in range(k)
            ],
        )
        for row, query in enumerate(queries)
    ]
    pictures = pictures.reshape(len(queries), k + 1, *pictures.shape[1:])
    # One canvas of tiles, each image inside a frame: black for the query, green for a
    # neighbour of the query's class, red otherwise. Ink is drawn dark on white.
    channels, height, width = pictures.shape[2:]
    frame, gap, label_space = 2, 3, max(6, height // 3)
    tile_h, tile_w = height + 2 * frame + label_space, width + 2 * frame + gap
    canvas = np.ones((len(queries) * tile_h, (k + 1) * tile_w, 3))
    colours = {"query": (0.0, 0.0, 0.0), True: (0.1, 0.6, 0.1), False: (0.85, 0.1, 0.1)}
    figure, axes = plt.subplots(figsize=(0.75 * (k + 1) + 0.5, 0.95 * len(queries) + 0.6))
    for row, query in enumerate(queries):
        for col in range(k + 1):
            match = "query" if col == 0 else bool(found.labels[row, col - 1] == labels[query])
            top, left = row * tile_h + label_space, col * tile_w
            canvas[top : top + height + 2 * frame, left : left + width + 2 * frame] = colours[match]
            image = pictures[row, col].transpose(1, 2, 0)
            image = np.repeat(1.0 - image, 3, axis=2) if channels == 1 else image
            canvas[top + frame : top + frame + height, left + frame : left + frame + width] = image
            family = None
            if col == 0:
                text, family = _plot_label(labels[query], class_names)
            else:
                text = f"{distances[row, col - 1]:.2f}"
            axes.text(
                left + width / 2 + frame,
                top - 0.5,
                text,
                ha="center",
                va="bottom",
                fontsize=6,
                color=colours[match],
                **({} if family is None else {"family": [*plt.rcParams["font.family"], family]}),
            )
    axes.imshow(canvas, interpolation="nearest")
    axes.set_axis_off()
    axes.set_title(
        "Queries (left, with their class) and nearest neighbours with distances\n"
        "green: same class, red: another class",
        fontsize=8,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return listed


def _names_html(shown: np.ndarray, class_names: Sequence[str] | None) -> str:
    """The map's classes as text, each beside its colour in the plot."""
    colours = plt.get_cmap("tab20")
    items = []
    for i, label in enumerate(shown):
        red, green, blue = (round(255 * c) for c in colours(i % 20)[:3])
        swatch = f'<span style="color:rgb({red},{green},{blue})">&#9679;</span>'
        items.append(f"{swatch} {html.escape(class_name(label, class_names))}")
    return '<p class="classes">Classes: ' + ", ".join(items) + "</p>"


def _grid_html(listed: list[tuple[str, list[tuple[str, float]]]]) -> str:
    """The example queries as a table: the query's class, then each neighbour's class and
    distance (the same rows as the grid)."""
    rows = ["<table><tr><th>query class</th><th>neighbours: class (distance)</th></tr>"]
    for query, neighbours in listed:
        cells = ", ".join(
            f"{'<b>' if name == query else ''}{html.escape(name)}"
            f"{'</b>' if name == query else ''} ({value:.2f})"
            for name, value in neighbours
        )
        rows.append(f"<tr><td>{html.escape(query)}</td><td>{cells}</td></tr>")
    return "\n".join(rows) + "</table>"


def _selection_html(summary: Mapping[str, Any]) -> list[str]:
    """Which split the best epoch was chosen on; a warning when it was the test split."""
    selection = summary.get("selection")
    if not selection:
        return []
    text = (
        f"The best epoch was chosen by {selection['metric']} on the {selection['split']} split "
        f"({selection['classes']} classes); the table above was measured once, after training."
    )
    if selection["split"] != selection["asked"]:
        text += (
            f" eval.select_split={selection['asked']} had no classes (too few training classes "
            "to hold a validation share out), so the training classes were used."
        )
    lines = [f"<p>{html.escape(text)}</p>"]
    if selection["reads_test"]:
        lines.append(
            "<p><strong>Warning: the model was chosen on the test split "
            "(eval.select_split=test), so the test metrics above are optimistic; they are "
            "not a fair measure of unseen classes.</strong></p>"
        )
    return lines


def write_report(
    folder: str | Path,
    *,
    history: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    embeddings: np.ndarray,
    labels: np.ndarray,
    images: ImageSource | None = None,
    class_names: Sequence[str] | None = None,
    config_text: str = "",
    distance: str = "euclidean",
    projection: str = "pca",
    map_classes: int = 12,
    queries: int = 8,
    neighbours: int = 8,
) -> Path:
    """Write ``folder/plots/*.png`` and ``folder/report.html``; return the HTML path.

    Parameters:
        folder: the run folder.
        history: the records of metrics.jsonl ("train" and "eval" events).
        summary: a dict with "before" (may be None) and "after" metrics and "best_epoch";
            optionally "split" (of before/after) and "selection" (as the trainer writes).
        embeddings, labels: (N, D) evaluation embeddings of the best model and their labels.
        images: maps item indices to images for the neighbour grid (None: no grid).
        class_names: the name of each label id (``class_names[label]``); None: the ids.
        config_text: the run's config.yaml, shown in the report.
        distance: "euclidean" or "cosine", as in evaluation.
        projection: "pca" or "tsne" for the 2-D map; map_classes: classes shown in it.
        queries, neighbours: size of the example grid.
    """
    folder = Path(folder)
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    figures: list[tuple[str, str, str]] = []

    _plot_training_curves(history, plots / "training_curves.png")
    figures.append(("training_curves.png", "Training loss per step and metrics per epoch.", ""))
    curve = _recall_curve(embeddings, labels, distance)
    _plot_recall_at_k(curve, summary.get("before"), plots / "recall_at_k.png")
    figures.append(("recall_at_k.png", "Recall@K of the evaluation split (each item a query).", ""))
    positive, negative = _pair_distances(embeddings, labels, distance)
    _plot_distances(positive, negative, distance, plots / "distances.png")
    figures.append(("distances.png", "Distances of sampled same-class and other-class pairs.", ""))
    shown = _plot_map(
        embeddings, labels, map_classes, projection, plots / "embedding_map.png", class_names
    )
    figures.append(
        (
            "embedding_map.png",
            "A 2-D projection of the evaluation embeddings.",
            _names_html(shown, class_names),
        )
    )
    listed = None
    if images is not None:
        listed = _plot_queries(
            embeddings,
            labels,
            images,
            queries,
            neighbours,
            distance,
            plots / "example_queries.png",
            class_names,
        )
    if listed is not None:
        figures.append(
            (
                "example_queries.png",
                "Random queries and their nearest neighbours.",
                _grid_html(listed),
            )
        )

    table = comparison_table(summary.get("before"), summary["after"])
    split = summary.get("split", "evaluation")
    body = [
        "<h1>deepmetric training report</h1>",
        f"<p>Run folder <code>{html.escape(str(folder.resolve()))}</code>; best epoch "
        f"{summary.get('best_epoch')}; Recall@K: "
        + ", ".join(f"R@{k} {v:.3f}" for k, v in curve.items())
        + "</p>",
        f"<h2>Metrics of the {html.escape(split)} split</h2>",
        f"<pre>{html.escape(table)}</pre>",
        *_selection_html(summary),
    ]
    for name, caption, names in figures:
        body.append(f'<figure><img src="plots/{name}" alt="{name}"><figcaption>')
        body.append(f"{html.escape(caption)}</figcaption>{names}</figure>")
    body.append(f"<h2>Config</h2><pre>{html.escape(config_text)}</pre>")
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>deepmetric report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "img{max-width:100%}figure{margin:1.5em 0}pre{background:#f4f4f4;padding:1em}"
        "td,th{text-align:left;padding:0 1em 0 0;font-size:90%}</style>"
        "</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
