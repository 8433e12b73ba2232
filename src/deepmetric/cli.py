"""The `deepmetric` command: train, evaluate, embed, index, search, report, sweep-temperature.

    deepmetric train                          # Kanji-Fonts-32, default recipe, a few minutes
    deepmetric train --config run.yaml train.epochs=5 loss.name=TripletMarginLoss
    deepmetric train --resume runs/20250101-120000
    deepmetric evaluate RUN                   # metrics of the best checkpoint
    deepmetric embed RUN DATA                 # embeddings of a data set, to .npz
    deepmetric index RUN DATA                 # a nearest-neighbour index over DATA
    deepmetric search RUN QUERY               # nearest neighbours, distances and labels
    deepmetric report RUN                     # (re)write report.html
    deepmetric sweep-temperature              # normalised-softmax temperature sweep

docs/cli.md describes every command, config key and file of the run folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from deepmetric.data import IMAGE_EXTENSIONS, ArrayDataset, LabeledDataset, load_image
from deepmetric.index import NeighbourIndex
from deepmetric.metrics import format_table
from deepmetric.report import comparison_table
from deepmetric.training.checkpoint import atomic_write
from deepmetric.training.config import Config, config_help, load_config
from deepmetric.training.data import LabeledSubset, data_from_spec, images_of, load_split
from deepmetric.training.errors import CheckpointError, ConfigError
from deepmetric.training.run_folder import RunFolder
from deepmetric.training.trainer import (
    build_index,
    embed,
    evaluate_embeddings,
    load_model,
    pick_device,
    pick_precision,
    report_run,
    train,
)

__all__ = ["main"]

SWEEP_TEMPERATURES = (0.005, 0.01, 0.03, 0.05, 0.1, 0.5, 1.0)


def _checkpoint(run: RunFolder, which: str) -> Path:
    return run.best if which == "best" else run.last


def _model(run: RunFolder, which: str) -> tuple[nn.Module, Config, tuple[int, ...]]:
    model, config, input_shape = load_model(_checkpoint(run, which), run.read_config())
    return model.to(pick_device(config.train.device)), config, input_shape


def _embed(model: nn.Module, config: Config, dataset: LabeledDataset) -> np.ndarray:
    """Embeddings as in training: the same device, batch size and autocast precision."""
    device = next(model.parameters()).device
    precision = pick_precision(config.train.precision, device)
    return embed(
        model, dataset, batch_size=config.eval.batch_size, device=device, precision=precision
    )


def cmd_train(args: argparse.Namespace) -> None:
    if args.resume:
        run = RunFolder(args.resume)
        base = run.read_config().to_dict()
        config = load_config(args.config, args.overrides, base=base)
        run_dir, resume = args.resume, True
    else:
        config = load_config(args.config, args.overrides)
        run_dir = args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        resume = False
    if not args.quiet:
        print(f"run folder: {run_dir}", flush=True)
    summary = train(config, run_dir, resume=resume, quiet=args.quiet)
    print(comparison_table(summary["before"], summary["after"]))
    print(
        f"best epoch {summary['best_epoch']}, {summary['steps']} steps, "
        f"{summary['train_seconds']:.0f} s training; results in {run_dir}"
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    run = RunFolder(args.run)
    model, config, _ = _model(run, args.checkpoint)
    if args.data is None:
        dataset = load_split(config.data, args.split or config.eval.split)
    else:
        dataset = data_from_spec(args.data, args.split or "all", config.data)
    metrics = evaluate_embeddings(_embed(model, config, dataset), dataset.labels, config.eval)
    print(format_table(metrics, title=f"{args.checkpoint} checkpoint of {run.root}"))


def cmd_embed(args: argparse.Namespace) -> None:
    run = RunFolder(args.run)
    model, config, _ = _model(run, args.checkpoint)
    dataset = data_from_spec(args.data, args.split, config.data)
    embeddings = _embed(model, config, dataset)
    out = Path(args.out or run.root / f"embeddings-{Path(args.data).name}-{args.split}.npz")

    def write(temp: str) -> None:
        with open(temp, "wb") as file:
            np.savez(file, embeddings=embeddings, labels=dataset.labels)

    atomic_write(out, write)
    print(f"wrote {embeddings.shape[0]} embeddings of width {embeddings.shape[1]} to {out}")


def cmd_index(args: argparse.Namespace) -> None:
    run = RunFolder(args.run)
    model, config, _ = _model(run, args.checkpoint)
    dataset = data_from_spec(args.data, args.split, config.data)
    index = build_index(_embed(model, config, dataset), dataset.labels, config.eval.distance)
    out = Path(args.out or run.index)
    atomic_write(out, index.save)
    print(f"indexed {len(index)} items of {args.data} ({args.split}) in {out}")


def cmd_search(args: argparse.Namespace) -> None:
    run = RunFolder(args.run)
    model, config, input_shape = _model(run, args.checkpoint)
    index = NeighbourIndex.load(args.index or run.index)
    query = Path(args.query)
    if query.is_file() and query.suffix.lower() in IMAGE_EXTENSIONS:
        if len(input_shape) != 3:
            raise ConfigError(f"the model of {run.root} embeds vectors, not images like {query}")
        mode = "L" if input_shape[0] == 1 else "RGB"
        queries = ArrayDataset(load_image(query, mode, tuple(input_shape[1:]))[None], [0])
        names, query_labels = [query.name], [None]
    else:
        dataset = data_from_spec(args.query, args.split, config.data)
        rows = np.random.default_rng(0).choice(len(dataset), min(args.limit, len(dataset)), False)
        queries = LabeledSubset(dataset, rows)
        names, query_labels = [f"#{i}" for i in rows], queries.labels.tolist()
    embeddings = _embed(model, config, queries)
    if config.eval.distance == "cosine":
        embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    found = index.search(embeddings, min(args.k, len(index)))
    results = []
    for row, (name, label) in enumerate(zip(names, query_labels, strict=True)):
        print(f"query {name}" + ("" if label is None else f" (label {label})"))
        print("  rank  index   label       distance")
        for rank in range(found.k):
            raw = float(found.distances[row, rank])
            distance = np.sqrt(max(raw, 0.0)) if index.metric == "l2" else 1.0 + raw
            neighbour_label = None if found.labels is None else found.labels[row, rank].item()
            print(
                f"  {rank + 1:>4}  {found.indices[row, rank]:>6}  {neighbour_label!s:<10}  "
                f"{distance:.4f}"
            )
            results.append(
                {
                    "query": name,
                    "query_label": label,
                    "rank": rank + 1,
                    "index": int(found.indices[row, rank]),
                    "label": neighbour_label,
                    "distance": distance,
                }
            )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def cmd_report(args: argparse.Namespace) -> None:
    run = RunFolder(args.run)
    config = run.read_config()
    dataset = load_split(config.data, config.eval.split)
    path = report_run(run, config, images=lambda indices: images_of(dataset, indices))
    print(f"wrote {path}")


def cmd_sweep_temperature(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows = []
    for temperature in args.temperatures:
        overrides = [
            *args.overrides,
            "loss.name=NormalizedSoftmaxLoss",
            f"loss.params={{temperature: {temperature}}}",
            "eval.before_training=false",
            "report.enabled=false",
        ]  # and one evaluation, after the last epoch: no choice of epoch on the test split
        epochs = load_config(args.config, overrides).train.epochs
        config = load_config(args.config, [*overrides, f"eval.every_epochs={epochs}"])
        run = RunFolder(out / f"temperature-{temperature:g}")
        if not args.quiet:
            print(f"temperature {temperature:g}: {run.root}", flush=True)
        # An existing run (same config, checked) is resumed; a finished one only re-read.
        summary = train(config, run.root, resume=run.config.is_file(), quiet=args.quiet)
        rows.append((temperature, summary["after"]))
    table = [
        "| temperature | R@1 | MAP@R |",
        "| ---: | ---: | ---: |",
        *(f"| {t:g} | {m['recall@1']:.4f} | {m['map@r']:.4f} |" for t, m in rows),
    ]
    text = "\n".join(table) + "\n"
    RunFolder(out).write_text(out / "sweep.md", text)
    RunFolder(out).write_json(
        out / "sweep.json", [{"temperature": t, **metrics} for t, metrics in rows]
    )
    print(text, end="")
    print(f"wrote {out / 'sweep.md'} and {out / 'sweep.json'}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepmetric",
        description="Deep metric learning: train embedders, evaluate and search them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_arguments(command: argparse.ArgumentParser) -> None:
        command.add_argument("--config", type=Path, help="a YAML file of config sections")
        command.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="config overrides, e.g. train.epochs=3",
        )
        command.add_argument("--quiet", action="store_true", help="no progress bar or messages")

    train_command = commands.add_parser(
        "train",
        help="train an embedder (default: Kanji-Fonts-32)",
        description="Train an embedder and write a run folder (see docs/cli.md).",
        epilog="config keys (key=default, then what it means):\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_arguments(train_command)
    train_command.add_argument("--run-dir", type=Path, help="run folder (default runs/<time>)")
    train_command.add_argument("--resume", type=Path, metavar="RUN", help="continue a run")
    train_command.set_defaults(handler=cmd_train)

    def run_arguments(command: argparse.ArgumentParser) -> None:
        command.add_argument("run", type=Path, help="a run folder written by deepmetric train")
        command.add_argument(
            "--checkpoint", choices=("best", "last"), default="best", help="which model"
        )

    data_help = "kanji_fonts, digits, an image folder (one sub-folder per class) or a table file"
    evaluate_command = commands.add_parser("evaluate", help="metrics of a checkpoint on a split")
    run_arguments(evaluate_command)
    evaluate_command.add_argument("--split", help="train, test or all (default: eval.split)")
    evaluate_command.add_argument("--data", help=f"another data set: {data_help}")
    evaluate_command.set_defaults(handler=cmd_evaluate)

    embed_command = commands.add_parser("embed", help="write the embeddings of a data set")
    run_arguments(embed_command)
    embed_command.add_argument("data", help=data_help)
    embed_command.add_argument("--split", default="all", help="train, test or all")
    embed_command.add_argument("--out", type=Path, help="the .npz file to write")
    embed_command.set_defaults(handler=cmd_embed)

    index_command = commands.add_parser("index", help="build a nearest-neighbour index")
    run_arguments(index_command)
    index_command.add_argument("data", help=data_help)
    index_command.add_argument("--split", default="all", help="train, test or all")
    index_command.add_argument("--out", type=Path, help="the index file (default RUN/index.npz)")
    index_command.set_defaults(handler=cmd_index)

    search_command = commands.add_parser("search", help="nearest neighbours of queries")
    run_arguments(search_command)
    search_command.add_argument("query", help=f"an image file, or {data_help}")
    search_command.add_argument("-k", type=int, default=5, help="neighbours per query")
    search_command.add_argument("--split", default="test", help="split of a query data set")
    search_command.add_argument("--limit", type=int, default=5, help="queries from a data set")
    search_command.add_argument("--index", type=Path, help="index file (default RUN/index.npz)")
    search_command.add_argument("--out", type=Path, help="also write the results as JSON")
    search_command.set_defaults(handler=cmd_search)

    report_command = commands.add_parser("report", help="(re)write report.html of a run")
    report_command.add_argument("run", type=Path, help="a run folder written by deepmetric train")
    report_command.set_defaults(handler=cmd_report)

    sweep_command = commands.add_parser(
        "sweep-temperature",
        help="sweep the normalised-softmax temperature (survey table 1)",
        description="Train one run per temperature with NormalizedSoftmaxLoss and write the "
        "R@1 / MAP@R table (OUT/sweep.md, OUT/sweep.json). Finished runs are reused.",
    )
    config_arguments(sweep_command)
    sweep_command.add_argument(
        "--temperatures",
        type=lambda text: [float(t) for t in text.split(",")],
        default=list(SWEEP_TEMPERATURES),
        help="comma-separated (default: " + ",".join(f"{t:g}" for t in SWEEP_TEMPERATURES) + ")",
    )
    sweep_command.add_argument("--out", type=Path, default=Path("runs/temperature-sweep"))
    sweep_command.set_defaults(handler=cmd_sweep_temperature)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 bad input, 130 interrupted)."""
    args = _parser().parse_args(argv)
    try:
        args.handler(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        print(f"deepmetric {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
