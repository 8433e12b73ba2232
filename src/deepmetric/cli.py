"""The `deepmetric` command: train, evaluate, embed, index, search, report, sweep-temperature,
benchmark, export, serve.

    deepmetric train                          # Kanji-Fonts-32, default recipe, a few minutes
    deepmetric train --config run.yaml train.epochs=5 loss.name=TripletMarginLoss
    deepmetric train --resume runs/20250101-120000
    deepmetric train --resume RUN --restart   # a run without a checkpoint: from step 0
    deepmetric evaluate RUN                   # metrics of the best checkpoint
    deepmetric embed RUN DATA                 # embeddings of a data set, to .npz
    deepmetric index RUN DATA                 # a nearest-neighbour index over DATA
    deepmetric search RUN QUERY               # nearest neighbours, distances and labels
    deepmetric report RUN                     # (re)write report.html
    deepmetric export RUN --format onnx       # the embedder as TorchScript or ONNX, checked
    deepmetric serve RUN                      # HTTP embed + search, and a page to browse
    deepmetric sweep-temperature              # normalised-softmax temperature sweep
    deepmetric benchmark --jobs 2             # recipes x seeds, table of test MAP@R/R@1/NMI

docs/cli.md describes every command, config key and file of the run folder. A bad input
(config key or value, data, run folder file) ends the command with one line that names the
file or key and the fix, and exit status 2; ``--debug`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torch import nn

from deepmetric.benchmark import DEFAULT_RECIPES, parse_recipes, run_benchmark
from deepmetric.benchmark import table as benchmark_table
from deepmetric.data import (
    IMAGE_EXTENSIONS,
    ArrayDataset,
    DataError,
    LabeledDataset,
    load_image,
)
from deepmetric.export import FORMATS, TOLERANCE, ExportError, export_run
from deepmetric.index import IndexFileError, NeighbourIndex
from deepmetric.inference import load_run
from deepmetric.metrics import format_table
from deepmetric.report import class_name, comparison_table
from deepmetric.serve import ServeError, serve
from deepmetric.training.checkpoint import atomic_write
from deepmetric.training.config import Config, config_help, load_config
from deepmetric.training.data import (
    LabeledSubset,
    data_from_spec,
    images_of,
    is_run_data,
    load_split,
)
from deepmetric.training.distributed_run import embed_sharded, is_main, start_session
from deepmetric.training.errors import (
    CheckpointError,
    ConfigError,
    RunFolderError,
    TrainingDivergedError,
)
from deepmetric.training.run_folder import RunFolder, read_class_names
from deepmetric.training.trainer import (
    build_index,
    evaluate_embeddings,
    load_model,
    pick_device,
    pick_precision,
    report_run,
    train,
)

__all__ = ["main"]

SWEEP_TEMPERATURES = (0.005, 0.01, 0.03, 0.05, 0.1, 0.5, 1.0)
USER_ERRORS = (
    ConfigError,
    CheckpointError,
    RunFolderError,
    DataError,
    IndexFileError,
    FileNotFoundError,
    TrainingDivergedError,
    ExportError,
    ServeError,
)
"""Errors of the user's input, not of deepmetric: one line and exit status 2."""


def _checkpoint(run: RunFolder, which: str) -> Path:
    return run.best if which == "best" else run.last


def _model(run: RunFolder, which: str) -> tuple[nn.Module, Config, tuple[int, ...]]:
    model, config, input_shape = load_model(_checkpoint(run, which), run.read_config())
    return model.to(pick_device(config.train.device)), config, input_shape


def _embed(model: nn.Module, config: Config, dataset: LabeledDataset) -> np.ndarray:
    """Embeddings as in training: the same device, batch size and autocast precision."""
    device = next(model.parameters()).device
    precision = pick_precision(config.train.precision, device)
    return embed_sharded(  # under torchrun each rank embeds a share
        model, dataset, batch_size=config.eval.batch_size, device=device, precision=precision
    )


def _split(args: argparse.Namespace, config: Config) -> str:
    """The --split of a command, by default the split the run evaluated (eval.split)."""
    return args.split or config.eval.split


def _refuse_overwrite(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise RunFolderError(
            f"{path} exists: pass --force to overwrite it, or --out <another file>"
        )


def _load_index(path: Path) -> NeighbourIndex:
    """The index file ``path``; a missing or damaged file raises `IndexFileError` naming it."""
    try:
        return NeighbourIndex.load(path)
    except ImportError as error:  # an IVF or HNSW index without faiss installed
        raise RunFolderError(f"{path}: {error}") from error


def _names_file(index_path: Path) -> Path:
    """The class names written beside an index file by `deepmetric index`."""
    return index_path.with_name(index_path.stem + ".class_names.json")


def cmd_train(args: argparse.Namespace) -> None:
    if args.restart and not args.resume:
        raise ConfigError(
            "--restart goes with --resume RUN: deepmetric train --resume RUN --restart"
        )
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
    summary = train(config, run_dir, resume=resume, restart=args.restart, quiet=args.quiet)
    print(f"{summary['split']} split, measured once after training:")
    print(comparison_table(summary["before"], summary["after"]))
    selection = summary["selection"]
    if selection["reads_test"]:
        print("warning: the best epoch was chosen on the test split (eval.select_split=test)")
    print(
        f"best epoch {summary['best_epoch']} (by {selection['metric']} on the "
        f"{selection['split']} split), {summary['steps']} steps, "
        f"{summary['train_seconds']:.0f} s training; results in {run_dir}"
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    run = RunFolder(args.run)
    model, config, _ = _model(run, args.checkpoint)
    if args.data is None:
        dataset = load_split(config.data, _split(args, config))
    else:
        own = is_run_data(args.data, config.data)  # the run's items, or all of another set
        dataset = data_from_spec(
            args.data, _split(args, config) if own else args.split or "all", config.data
        )
    embeddings = _embed(model, config, dataset)
    try:
        metrics = evaluate_embeddings(embeddings, dataset.labels, config.eval)
    except ValueError as error:  # e.g. Recall@8 of a set with 5 items
        raise DataError(
            f"cannot evaluate {len(dataset)} items of {len(np.unique(dataset.labels))} classes "
            f"with the run's eval settings: {error}"
        ) from error
    print(format_table(metrics, title=f"{args.checkpoint} checkpoint of {run.root}"))
    classes = np.unique(dataset.labels)
    names = [class_name(label, dataset.class_names) for label in classes[:10]]
    more = f" and {len(classes) - 10} more" if len(classes) > 10 else ""
    print(f"{len(dataset)} items of {len(classes)} classes: {', '.join(names)}{more}")


class _EmbeddedSplit(NamedTuple):
    """A split of a data set embedded by a run's model, and the file to write it to."""

    run: RunFolder
    config: Config
    split: str
    out: Path
    dataset: LabeledDataset
    embeddings: np.ndarray


def _embed_split(args: argparse.Namespace, stem: str) -> _EmbeddedSplit:
    """The work of `embed` and `index` before writing: the --split of the data set DATA
    embedded by the run's --checkpoint, and --out (default RUN/<stem>-DATA-SPLIT.npz),
    refused before any work when it exists and --force is not given."""
    run = RunFolder(args.run)
    model, config, _ = _model(run, args.checkpoint)
    split = _split(args, config)
    out = Path(args.out or run.root / f"{stem}-{Path(args.data).name}-{split}.npz")
    _refuse_overwrite(out, args.force)
    dataset = data_from_spec(args.data, split, config.data)
    return _EmbeddedSplit(run, config, split, out, dataset, _embed(model, config, dataset))


def cmd_embed(args: argparse.Namespace) -> None:
    embedded = _embed_split(args, "embeddings")
    embeddings, labels, out = embedded.embeddings, embedded.dataset.labels, embedded.out
    names = np.array(embedded.dataset.class_names, dtype=str)

    def write(temp: str) -> None:
        with open(temp, "wb") as file:
            np.savez(file, embeddings=embeddings, labels=labels, class_names=names)

    if is_main():  # under torchrun rank 0 alone writes
        atomic_write(out, write)
    print(f"wrote {embeddings.shape[0]} embeddings of width {embeddings.shape[1]} to {out}")


def cmd_index(args: argparse.Namespace) -> None:
    embedded = _embed_split(args, "index")
    dataset, out = embedded.dataset, embedded.out
    index = build_index(embedded.embeddings, dataset.labels, embedded.config.eval.distance)
    if is_main():  # under torchrun rank 0 alone writes
        atomic_write(out, index.save)
        RunFolder(out.parent).write_json(_names_file(out), dataset.class_names)
    print(f"indexed {len(index)} items of {args.data} ({embedded.split}) in {out}")
    print(f"search it with: deepmetric search {embedded.run.root} QUERY --index {out}")


def cmd_search(args: argparse.Namespace) -> None:
    run = RunFolder(args.run)
    model, config, input_shape = _model(run, args.checkpoint)
    index_path = Path(args.index or run.index)
    index = _load_index(index_path)
    names_path = _names_file(index_path)
    index_names = (
        read_class_names(names_path)
        if args.index and names_path.is_file()
        else run.load_class_names()
    )
    query = Path(args.query)
    exclude = None
    if query.is_file() and query.suffix.lower() in IMAGE_EXTENSIONS:
        if len(input_shape) != 3:
            raise ConfigError(f"the model of {run.root} embeds vectors, not images like {query}")
        mode = "L" if input_shape[0] == 1 else "RGB"
        queries = ArrayDataset(load_image(query, mode, tuple(input_shape[1:]))[None], [0])
        titles, query_labels, query_names = [query.name], [None], [None]
    else:
        split = _split(args, config)
        dataset = data_from_spec(args.query, split, config.data)
        rows = np.random.default_rng(0).choice(len(dataset), min(args.limit, len(dataset)), False)
        queries = LabeledSubset(dataset, rows)
        titles, query_labels = [f"#{i}" for i in rows], queries.labels.tolist()
        query_names = [class_name(label, dataset.class_names) for label in query_labels]
        if args.index is None and is_run_data(args.query, config.data):
            if split == config.eval.split and _same_items(run, dataset):
                exclude = rows  # the queries are items of the index: not their own answer
            elif not np.isin(query_labels, _labels(run)).any():
                print(
                    f"note: the index of {run.root} holds the {config.eval.split} split; "
                    f"queries from --split {split} have none of its classes",
                    file=sys.stderr,
                )
    embeddings = _embed(model, config, queries)
    if config.eval.distance == "cosine":
        embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    k = min(args.k, len(index) - (exclude is not None))
    found = index.search(embeddings, k, exclude=exclude)
    results = []
    for row, (title, label, name) in enumerate(zip(titles, query_labels, query_names, strict=True)):
        print(f"query {title}" + ("" if name is None else f" (label {name})"))
        print("  rank  index   label       distance")
        for rank in range(found.k):
            raw = float(found.distances[row, rank])
            distance = np.sqrt(max(raw, 0.0)) if index.metric == "l2" else 1.0 + raw
            neighbour_label = None if found.labels is None else found.labels[row, rank].item()
            neighbour_name = (
                None if neighbour_label is None else class_name(neighbour_label, index_names)
            )
            print(
                f"  {rank + 1:>4}  {found.indices[row, rank]:>6}  {neighbour_name!s:<10}  "
                f"{distance:.4f}"
            )
            results.append(
                {
                    "query": title,
                    "query_label": label,
                    "query_name": name,
                    "rank": rank + 1,
                    "index": int(found.indices[row, rank]),
                    "label": neighbour_label,
                    "name": neighbour_name,
                    "distance": distance,
                }
            )
    if args.out:
        Path(args.out).write_text(
            json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def _labels(run: RunFolder) -> np.ndarray:
    """The labels of the run's evaluation embeddings (the items of its index)."""
    return run.load_embeddings()[1]


def _same_items(run: RunFolder, dataset: LabeledDataset) -> bool:
    """Whether ``dataset`` holds the items of the run's index, in its order (the run's
    evaluation split)."""
    labels = _labels(run)
    return len(labels) == len(dataset) and bool(np.array_equal(labels, dataset.labels))


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
        ]
        config = load_config(args.config, overrides)
        run = RunFolder(out / f"temperature-{temperature:g}")
        if not args.quiet:
            print(f"temperature {temperature:g}: {run.root}", flush=True)
        # An existing run (same config, checked) is resumed, a finished one only re-read, and
        # one that stopped before its first checkpoint starts again (its log kept).
        existing = run.config.is_file()
        summary = train(config, run.root, resume=existing, restart=existing, quiet=args.quiet)
        rows.append((temperature, summary))
    # The choice reads the selection split (validation classes) only; test is reported.
    select = rows[0][1]["selection"]
    metric = select["metric"]
    chosen = max(rows, key=lambda row: row[1]["selection"]["best"][metric])[0]
    final = rows[0][1]["split"]
    table = [
        f"| temperature | {select['split']} R@1 | {select['split']} MAP@R "
        f"| {final} R@1 | {final} MAP@R |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {t:g}{' (chosen)' if t == chosen else ''} "
            f"| {s['selection']['best']['recall@1']:.4f} | {s['selection']['best']['map@r']:.4f} "
            f"| {s['after']['recall@1']:.4f} | {s['after']['map@r']:.4f} |"
            for t, s in rows
        ),
    ]
    note = (
        f"Chosen by {metric} on the {select['split']} split"
        + (" (the test split: optimistic)" if select["reads_test"] else "")
        + f"; the {final} columns were measured once per run, after training."
    )
    text = "\n".join(table) + "\n\n" + note + "\n"
    RunFolder(out).write_text(out / "sweep.md", text)
    RunFolder(out).write_json(
        out / "sweep.json",
        [
            {
                "temperature": t,
                "chosen": t == chosen,
                "selection_split": s["selection"]["split"],
                "selection": s["selection"]["best"],
                "split": s["split"],
                **s["after"],
            }
            for t, s in rows
        ],
    )
    print(text, end="")
    print(f"wrote {out / 'sweep.md'} and {out / 'sweep.json'}")


def cmd_benchmark(args: argparse.Namespace) -> None:
    if args.recipes is not None and not args.recipes.is_file():
        raise ConfigError(f"--recipes {args.recipes} does not exist: pass a YAML file")
    text = DEFAULT_RECIPES if args.recipes is None else args.recipes.read_text(encoding="utf-8")
    if args.list:
        print(text, end="")
        return
    results = run_benchmark(
        parse_recipes(text),
        args.seeds,
        args.out,
        overrides=args.overrides,
        config_path=args.config,
        jobs=args.jobs,
        say=(lambda line: None) if args.quiet else (lambda line: print(line, flush=True)),
    )
    print(benchmark_table(results), end="")


def cmd_export(args: argparse.Namespace) -> None:
    run = load_run(args.run, checkpoint=args.checkpoint, device="cpu")
    result = export_run(run, args.format, args.out, tolerance=args.tolerance)
    print(f"wrote {result.path} ({result.format})")
    print(
        f"checked on {result.num_checked} items of the {result.split} split: the embeddings "
        f"differ from the PyTorch model's by at most {result.max_abs_diff:.2e} "
        f"(max abs difference; tolerance {result.tolerance:g})"
    )


def cmd_serve(args: argparse.Namespace) -> None:
    serve(args.run, args.host, args.port, checkpoint=args.checkpoint)


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


SPLITS = ("train", "val", "test", "all")
DEBUG_HELP = "on an error, also print the traceback"


class _CommandParser(argparse.ArgumentParser):
    """The parser of one command: every command also takes --debug."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepmetric",
        description="Deep metric learning: train embedders, evaluate and search them.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )

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
    train_command.add_argument(
        "--restart",
        action="store_true",
        help="with --resume: if RUN has no checkpoint, start it again from step 0 (its old "
        "metrics.jsonl is kept as metrics-N.jsonl) instead of refusing",
    )
    train_command.set_defaults(handler=cmd_train)

    def run_arguments(command: argparse.ArgumentParser) -> None:
        command.add_argument("run", type=Path, help="a run folder written by deepmetric train")
        command.add_argument(
            "--checkpoint", choices=("best", "last"), default="best", help="which model"
        )

    data_help = "kanji_fonts, digits, an image folder (one sub-folder per class) or a table file"
    split_help = "train, test or all (default: eval.split)"
    evaluate_command = commands.add_parser("evaluate", help="metrics of a checkpoint on a split")
    run_arguments(evaluate_command)
    evaluate_command.add_argument("--split", choices=SPLITS, help=split_help)
    evaluate_command.add_argument("--data", help=f"another data set: {data_help}")
    evaluate_command.set_defaults(handler=cmd_evaluate)

    def embed_split_arguments(command: argparse.ArgumentParser, out: str, force: str) -> None:
        """The arguments of a command that embeds a split of DATA into a file (`_embed_split`);
        ``out`` and ``force`` are the help of --out and --force."""
        run_arguments(command)
        command.add_argument("data", help=data_help)
        command.add_argument("--split", choices=SPLITS, help=split_help)
        command.add_argument("--out", type=Path, help=out)
        command.add_argument("--force", action="store_true", help=force)

    embed_command = commands.add_parser("embed", help="write the embeddings of a data set")
    embed_split_arguments(
        embed_command, "the .npz file (default RUN/embeddings-DATA-SPLIT.npz)", "overwrite --out"
    )
    embed_command.set_defaults(handler=cmd_embed)

    index_command = commands.add_parser("index", help="build a nearest-neighbour index")
    embed_split_arguments(
        index_command,
        "the index file (default RUN/index-DATA-SPLIT.npz)",
        "overwrite --out (even RUN/index.npz)",
    )
    index_command.set_defaults(handler=cmd_index)

    search_command = commands.add_parser("search", help="nearest neighbours of queries")
    run_arguments(search_command)
    search_command.add_argument("query", help=f"an image file, or {data_help}")
    search_command.add_argument("-k", type=_positive, default=5, help="neighbours per query")
    search_command.add_argument(
        "--split", choices=SPLITS, help="split of a query data set (default: eval.split)"
    )
    search_command.add_argument(
        "--limit", type=_positive, default=5, help="queries from a data set"
    )
    search_command.add_argument("--index", type=Path, help="index file (default RUN/index.npz)")
    search_command.add_argument("--out", type=Path, help="also write the results as JSON")
    search_command.set_defaults(handler=cmd_search)

    report_command = commands.add_parser("report", help="(re)write report.html of a run")
    report_command.add_argument("run", type=Path, help="a run folder written by deepmetric train")
    report_command.set_defaults(handler=cmd_report)

    export_command = commands.add_parser(
        "export",
        help="export the embedder to TorchScript or ONNX (checked against PyTorch)",
        description="Write the embedder as a file that runs without deepmetric, after checking "
        "that its embeddings of real items of the run's index equal the PyTorch model's "
        "(see docs/inference.md).",
    )
    run_arguments(export_command)
    export_command.add_argument("--format", choices=FORMATS, default="torchscript")
    export_command.add_argument(
        "--out", type=Path, help="the file (default RUN/embedder.torchscript.pt or .onnx)"
    )
    export_command.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help=f"largest absolute difference of embeddings allowed (default {TOLERANCE:g})",
    )
    export_command.set_defaults(handler=cmd_export)

    serve_command = commands.add_parser(
        "serve",
        help="serve embed and search over HTTP, with a search page",
        description="Serve POST /embed, POST /search, GET /health and a search page at / "
        "(needs pip install 'deepmetric[serve]'; see docs/inference.md).",
    )
    run_arguments(serve_command)
    serve_command.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve_command.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve_command.set_defaults(handler=cmd_serve)

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

    benchmark_command = commands.add_parser(
        "benchmark",
        help="train recipes x seeds under one protocol; table of test MAP@R, R@1, NMI",
        description="Train each recipe (loss, miner, hyper-parameters) with each seed, the "
        "same data, model and step budget (the key=value overrides), the best epoch chosen on "
        "the validation classes; write OUT/benchmark.md, .json and .png (mean and std over "
        "seeds on the test split). Finished runs are kept: run it again to continue.",
    )
    config_arguments(benchmark_command)
    benchmark_command.add_argument(
        "--recipes", type=Path, help="a YAML list of recipes (default: the built-in list)"
    )
    benchmark_command.add_argument(
        "--seeds",
        type=lambda text: [int(t) for t in text.split(",")],
        default=[0, 1, 2],
        help="comma-separated train.seed values (default 0,1,2)",
    )
    benchmark_command.add_argument(
        "--jobs", type=_positive, default=1, help="runs trained in parallel processes"
    )
    benchmark_command.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    benchmark_command.add_argument(
        "--list", action="store_true", help="print the recipes (YAML) and exit"
    )
    benchmark_command.set_defaults(handler=cmd_benchmark)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 bad input, 130 interrupted).

    A bad input prints one line naming the file or key and the fix (``--debug``: and the
    traceback); any other exception is a bug and shows its traceback.
    """
    args = _parser().parse_args(argv)
    session = start_session()  # under torchrun: join its processes; rank 0 alone prints
    quiet = contextlib.redirect_stdout(io.StringIO()) if not session.is_main else None
    try:
        with quiet or contextlib.nullcontext():
            args.handler(args)
    except USER_ERRORS as error:
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"deepmetric {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
