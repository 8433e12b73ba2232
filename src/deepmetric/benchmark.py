"""`deepmetric benchmark`: recipes x seeds under one protocol, the table and plot of results.

Each recipe (a loss, an optional miner and their hyper-parameters, as config overrides) is
trained once per seed with the same backbone, data and step budget (the shared overrides);
every run chooses its best epoch on the validation classes (`eval.select_split=val`) and
is measured once on the test split. The table gives, per recipe, the mean and standard
deviation over seeds of MAP@R, R@1 and NMI on the test split, and which recipes differ from
the reference recipe by more than the seed noise. Finished runs are kept: the command run
again after an interruption trains only what is missing (an interrupted run resumes from its
last checkpoint). ``jobs`` > 1 trains runs in parallel processes.

    >>> recipes = parse_recipes("- name: ns\\n  loss.name: NormalizedSoftmaxLoss\\n")
    >>> recipes[0].name, recipes[0].overrides
    ('ns', ['loss.name=NormalizedSoftmaxLoss'])
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deepmetric.training.config import load_config
from deepmetric.training.errors import ConfigError
from deepmetric.training.run_folder import RunFolder
from deepmetric.training.trainer import train

__all__ = [
    "DEFAULT_RECIPES",
    "METRICS",
    "Recipe",
    "parse_recipes",
    "run_benchmark",
    "summarise",
]

METRICS = ("map@r", "recall@1", "nmi")
"""The test-split metrics of the table (mean and standard deviation over seeds)."""

DEFAULT_RECIPES = """\
# One entry per recipe: a name and config overrides (section.key: value). Shared settings
# (data, model, step budget) come from the command line and apply to every recipe.
- name: contrastive
  loss.name: ContrastiveLoss
  loss.params: {pos_margin: 0.0, neg_margin: 0.5}
- name: triplet-semihard
  loss.name: TripletMarginLoss
  loss.params: {margin: 0.1}
  miner.name: TripletMarginMiner
  miner.params: {margin: 0.1, type_of_triplets: semihard}
- name: multi-similarity
  loss.name: MultiSimilarityLoss
  loss.params: {alpha: 2.0, beta: 50.0, base: 0.5}
  miner.name: MultiSimilarityMiner
  miner.params: {epsilon: 0.1}
- name: proxy-anchor
  loss.name: ProxyAnchorLoss
  loss.params: {margin: 0.1, alpha: 32.0}
- name: normalized-softmax
  loss.name: NormalizedSoftmaxLoss
  loss.params: {temperature: 0.1}
- name: normalized-softmax-t0.05
  loss.name: NormalizedSoftmaxLoss
  loss.params: {temperature: 0.05}
- name: normalized-softmax-t0.5
  loss.name: NormalizedSoftmaxLoss
  loss.params: {temperature: 0.5}
- name: cosface
  loss.name: CosFaceLoss
  loss.params: {margin: 0.35, scale: 64.0}
- name: arcface
  loss.name: ArcFaceLoss
  loss.params: {margin: 0.5, scale: 64.0}
- name: additive-margin-0.1
  loss.name: AdditiveMarginLoss
  loss.params: {margin: 0.1, scale: 10.0}
- name: additive-margin-0.3
  loss.name: AdditiveMarginLoss
  loss.params: {margin: 0.3, scale: 10.0}
- name: additive-margin-adaptive
  loss.name: AdditiveMarginLoss
  loss.params: {margin: {adaptive: {update_every: 10}}, scale: 10.0}
"""
"""The default recipes: one per family (pair, triplet with a miner, multi-similarity, proxy,
normalised softmax at three temperatures, CosFace, ArcFace) and seed 000's additive margin,
fixed at two values and adaptive."""

REFERENCE = "normalized-softmax"
"""The recipe the others are compared with (when the list holds it; else the first)."""


@dataclass(frozen=True)
class Recipe:
    """A named list of config overrides (``section.key=value``)."""

    name: str
    overrides: list[str]


def parse_recipes(text: str) -> list[Recipe]:
    """Recipes from YAML text: a list of mappings with a ``name`` and ``section.key: value``
    overrides. Raises `ConfigError` for a malformed list or a repeated name."""
    try:
        entries = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"the recipes are not valid YAML: {error}") from error
    if not isinstance(entries, list) or not entries:
        raise ConfigError("the recipes file must hold a non-empty list of recipes (- name: ...)")
    recipes = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"recipe {position + 1} must be a mapping with a name: ...")
        name = entry["name"]
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ConfigError(f"recipe name {name!r}: use letters, digits, '.', '_' or '-'")
        overrides = [
            f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...')}"
            for key, value in entry.items()
            if key != "name"
        ]
        recipes.append(Recipe(name, [o.strip() for o in overrides]))
    names = [recipe.name for recipe in recipes]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"recipe names must be unique: {', '.join(repeated)} repeated")
    return recipes


def _run_one(root: str, overrides: list[str], config_path: str | None) -> dict[str, Any]:
    """Train (or resume, or re-read) one run; its summary. Runs in a worker process."""
    config = load_config(config_path, overrides)
    run = RunFolder(root)
    if run.summary.is_file() and run.config.is_file():
        if run.read_config() == config:
            return json.loads(run.summary.read_text(encoding="utf-8"))
    existing = run.config.is_file()
    try:
        return train(config, root, resume=existing, restart=existing, quiet=True)
    except KeyboardInterrupt:
        if _ORPHANED.is_set():  # the run is saved and nobody waits for its result
            os._exit(130)
        raise


_ORPHANED = threading.Event()
"""Set in a worker process whose benchmark process is gone."""

SAVE_SECONDS = 120.0
"""How long an orphaned worker may take to save its run before it is ended regardless."""


def _stop_with_parent(parent: int) -> None:
    """Worker initialiser: when the benchmark process ``parent`` is gone (killed by SIGTERM or
    SIGKILL, crashed), interrupt this worker as Ctrl-C would, so that its run saves a
    checkpoint (which the next benchmark resumes), and end the worker instead of letting it
    train on, or wait for work, as an orphan."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        _ORPHANED.set()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(SAVE_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()


def run_benchmark(
    recipes: Sequence[Recipe],
    seeds: Sequence[int],
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    config_path: str | Path | None = None,
    jobs: int = 1,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every recipe with every seed under ``out/<recipe>/seed-<s>`` (finished runs are
    re-read, interrupted ones resumed), then write ``out/benchmark.md``, ``benchmark.json``
    and ``benchmark.png``; return the results. ``overrides`` apply to every run (the data,
    model and step budget); ``jobs`` runs train in parallel processes (one thread each).
    """
    out = Path(out)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    shared = [*overrides, "report.enabled=false", "eval.select_split=val"]
    if jobs > 1:
        shared.append("train.threads=1")
    tasks = []
    for recipe in recipes:
        for seed in seeds:
            run_overrides = [*shared, *recipe.overrides, f"train.seed={seed}"]
            load_config(config_path, run_overrides)  # every config checked before any run
            tasks.append(
                (recipe.name, seed, str(out / recipe.name / f"seed-{seed}"), run_overrides)
            )
    path = None if config_path is None else str(config_path)
    started = time.perf_counter()
    summaries: dict[tuple[str, int], dict[str, Any]] = {}
    if jobs == 1:
        for name, seed, root, run_overrides in tasks:
            say(f"{name} seed {seed}: {root}")
            summaries[name, seed] = _run_one(root, run_overrides, path)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=context,
            initializer=_stop_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futures = {
                (name, seed): pool.submit(_run_one, root, run_overrides, path)
                for name, seed, root, run_overrides in tasks
            }
            for (name, seed), future in futures.items():
                summaries[name, seed] = future.result()
                say(f"{name} seed {seed}: done")
    results = summarise(recipes, seeds, summaries)
    results["wall_seconds"] = time.perf_counter() - started
    results["overrides"] = list(overrides)
    _write(out, results)
    say(f"wrote {out / 'benchmark.md'}, {out / 'benchmark.json'} and {out / 'benchmark.png'}")
    return results


def summarise(
    recipes: Sequence[Recipe],
    seeds: Sequence[int],
    summaries: dict[tuple[str, int], dict[str, Any]],
) -> dict[str, Any]:
    """Mean and standard deviation (ddof 1; 0 for one seed) over seeds of each test metric
    and the validation MAP@R, and each recipe's difference from the reference recipe with
    the noise it is judged against: 2 x sqrt((s_a^2 + s_b^2) / 2), the pooled seed std."""
    rows = []
    for recipe in recipes:
        runs = [summaries[recipe.name, seed] for seed in seeds]
        row: dict[str, Any] = {"recipe": recipe.name, "overrides": recipe.overrides}
        for metric in METRICS:
            values = np.array([run["after"][metric] for run in runs], dtype=np.float64)
            row[metric] = {"mean": float(values.mean()), "std": _std(values)}
            row[metric]["values"] = values.tolist()
        val = np.array([run["selection"]["best"]["map@r"] for run in runs], dtype=np.float64)
        row["val_map@r"] = {"mean": float(val.mean()), "std": _std(val)}
        row["train_seconds"] = float(np.mean([run["train_seconds"] for run in runs]))
        row["selection_split"] = runs[0]["selection"]["split"]
        row["test_split"] = runs[0]["split"]
        rows.append(row)
    names = [row["recipe"] for row in rows]
    reference = rows[names.index(REFERENCE) if REFERENCE in names else 0]
    for row in rows:
        a, b = row["map@r"], reference["map@r"]
        noise = 2 * math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)
        row["vs_reference"] = {
            "difference": a["mean"] - b["mean"],
            "noise": noise,
            "exceeds_noise": abs(a["mean"] - b["mean"]) > noise and len(seeds) > 1,
        }
    return {"seeds": list(seeds), "reference": reference["recipe"], "rows": rows}


def _std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def table(results: dict[str, Any]) -> str:
    """The Markdown table of ``results`` (as `summarise` returns them)."""
    reference = results["reference"]
    lines = [
        f"| recipe | test MAP@R | test R@1 | test NMI | val MAP@R | MAP@R vs {reference} "
        "| beyond 2 x seed noise | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in sorted(results["rows"], key=lambda r: -r["map@r"]["mean"]):
        cells = [f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}" for m in (*METRICS, "val_map@r")]
        versus = row["vs_reference"]
        beyond = (
            "reference"
            if row["recipe"] == reference
            else ("yes" if versus["exceeds_noise"] else "no")
        )
        lines.append(
            f"| {row['recipe']} | {' | '.join(cells)} | {versus['difference']:+.4f} "
            f"(± {versus['noise']:.4f}) | {beyond} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _write(out: Path, results: dict[str, Any]) -> None:
    folder = RunFolder(out)
    seeds = ", ".join(str(s) for s in results["seeds"])
    text = (
        table(results)
        + f"\nMean ± standard deviation over seeds {seeds}; test metrics measured once per run "
        "after training, the best epoch chosen on the validation classes. "
        f"Wall time {results['wall_seconds']:.0f} s.\n"
    )
    folder.write_text(out / "benchmark.md", text)
    folder.write_json(out / "benchmark.json", results)
    _plot(results, out / "benchmark.png")


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(results["rows"], key=lambda r: r["map@r"]["mean"])
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    positions = np.arange(len(rows))
    for offset, metric in zip((-0.25, 0.0, 0.25), METRICS, strict=True):
        axes.barh(
            positions + offset,
            [r[metric]["mean"] for r in rows],
            height=0.25,
            xerr=[r[metric]["std"] for r in rows],
            label=f"test {metric}",
        )
    axes.set_yticks(positions, [r["recipe"] for r in rows])
    axes.set(xlim=(0, 1), xlabel="score (mean ± std over seeds)", title="deepmetric benchmark")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
