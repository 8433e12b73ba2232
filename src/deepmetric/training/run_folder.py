"""The run folder: where a training run keeps its config, log, checkpoints and results.

RUN/
  config.yaml          the resolved config (every key)
  class_names.json     the name of each label id: a JSON list, class_names[label]
  metrics.jsonl        one JSON object per line: evaluations and training loss
  tensorboard/         the same scalars as TensorBoard events (when tensorboard is installed)
  checkpoints/last.pt  the latest state (model, loss, optimiser, schedule, sampler, RNGs)
  checkpoints/best.pt  the model of the best evaluation (eval.select_metric)
  embeddings.npz       embeddings and labels of the evaluation split, from the best model
  index.npz            a NeighbourIndex over those embeddings (deepmetric search)
  summary.json         metrics before and after training, best epoch, timings
  report.html, plots/  the report and its PNG plots
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deepmetric._validation import FILE_READ_ERRORS, error_reason
from deepmetric.training.checkpoint import atomic_write
from deepmetric.training.config import Config, config_diff, load_config
from deepmetric.training.errors import CheckpointError, ConfigError, RunFolderError

__all__ = ["MetricsLog", "RunFolder", "read_class_names"]


@dataclass(frozen=True)
class RunFolder:
    """The paths of a run folder, and reading and writing its small files."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
    class_names = property(lambda self: self.root / "class_names.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    last = property(lambda self: self.root / "checkpoints" / "last.pt")
    best = property(lambda self: self.root / "checkpoints" / "best.pt")
    embeddings = property(lambda self: self.root / "embeddings.npz")
    index = property(lambda self: self.root / "index.npz")
    summary = property(lambda self: self.root / "summary.json")
    report = property(lambda self: self.root / "report.html")

    def read_config(self) -> Config:
        """The config the run was started with."""
        if not self.config.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a run folder (no config.yaml): pass the folder that "
                "deepmetric train wrote (e.g. runs/<date>-<time>)"
            )
        try:
            saved = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            saved = error
        if not isinstance(saved, dict):
            raise RunFolderError(
                f"{self.config} is damaged (not a YAML mapping of config sections): restore it, "
                "or start a new run"
            )
        try:
            return load_config(base=saved)
        except ConfigError as error:
            raise RunFolderError(
                f"{self.config} does not hold a valid config ({error}): fix the key it names"
            ) from error

    def check_new(self) -> None:
        """Refuse a folder that already holds a run (before anything is built or written)."""
        if not self.config.exists():
            return
        if self.last.is_file():
            hint = f"continue it with `deepmetric train --resume {self.root}`"
        else:
            hint = (
                f"it has no checkpoint: start it again with `deepmetric train --resume "
                f"{self.root} --restart`"
            )
        raise ConfigError(f"{self.root} already holds a run: {hint}, or choose another --run-dir")

    def check_resume(self, config: Config, restart: bool = False) -> None:
        """Refuse to resume with a changed config, or without ``checkpoints/last.pt`` unless
        ``restart`` (start again from step 0, keeping the old log: see `archive_logs`)."""
        changed = config_diff(self.read_config(), config)
        if changed:
            raise ConfigError(
                f"cannot resume {self.root}: its config changed ({'; '.join(changed)}): resume "
                f"with the run's own config (deepmetric train --resume {self.root} without "
                "--config or overrides), or start a new run with --run-dir"
            )
        if not self.last.is_file() and not restart:
            raise CheckpointError(
                f"cannot resume {self.root}: {self.last} is missing (the run stopped before "
                "its first checkpoint, or the file was removed); start it again from step 0 "
                f"with `deepmetric train --resume {self.root} --restart` (its metrics.jsonl "
                "is kept as metrics-1.jsonl)"
            )

    def start(self, config: Config, class_names: list[str]) -> list[Path]:
        """Write config.yaml and class_names.json of a new run; return what the run may
        write that did not exist before (its folder and parent folders included), for
        `discard`."""
        self.check_new()
        # The folder and any parent folder the run makes (runs/ of runs/<time>), and its files.
        owned = [folder for folder in (self.root, *self.root.parents) if not folder.exists()]
        names = ("config.yaml", "class_names.json", "metrics.jsonl", "tensorboard", "checkpoints")
        owned += [self.root / name for name in names if not (self.root / name).exists()]
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_text(self.config, config.to_yaml())
        self.write_json(self.class_names, class_names)
        return owned

    def reopen(self, class_names: list[str]) -> None:
        """Prepare a resumed run: remove the temporary files a kill left during a write, and
        write class_names.json if the run predates it."""
        for temp in self.root.rglob(".*.tmp"):
            temp.unlink()
        if not self.class_names.is_file():
            self.write_json(self.class_names, class_names)

    def archive_logs(self) -> list[Path]:
        """Rename metrics.jsonl and tensorboard/ to metrics-N.jsonl and tensorboard-N/ (the
        first free N), so a run started again from step 0 keeps its old log."""
        number = 1
        while any(
            (self.root / name).exists()
            for name in (f"metrics-{number}.jsonl", f"tensorboard-{number}")
        ):
            number += 1
        moved = []
        for path, target in (
            (self.metrics, self.root / f"metrics-{number}.jsonl"),
            (self.tensorboard, self.root / f"tensorboard-{number}"),
        ):
            if path.exists():
                path.rename(target)
                moved.append(target)
        return moved

    def discard(self, owned: list[Path]) -> None:
        """Remove what a new run wrote before its first step (``owned``, from `start`:
        config.yaml, class_names.json, the log, and the folder if the run created it), so
        the same command can run again; files that were there before are left alone."""
        folders = [path for path in owned if path == self.root or path in self.root.parents]
        for path in owned:
            if path not in folders:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        for folder in folders:  # the run's folder first, then the parents it made
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def load_class_names(self) -> list[str] | None:
        """The names of class_names.json, or None for a run that has none."""
        return read_class_names(self.class_names) if self.class_names.is_file() else None

    def write_text(self, path: Path, text: str) -> None:
        """Write ``text`` to ``path`` atomically."""
        atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))

    def write_json(self, path: Path, value: Any) -> None:
        """Write ``value`` as indented JSON to ``path`` atomically."""
        self.write_text(path, json.dumps(value, indent=2) + "\n")

    def history(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl, in order.

        A torn last line (a crash while it was written) is dropped with a warning; a damaged
        line before it raises `RunFolderError`.
        """
        if not self.metrics.is_file():
            return []
        text = self.metrics.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "step" not in record:
                    raise ValueError("not a record with a step")
            except ValueError as error:
                if number == len(lines) or all(not rest.strip() for rest in lines[number:]):
                    warnings.warn(
                        f"{self.metrics}: dropped a torn last line (line {number}, written "
                        "when the run was killed)",
                        stacklevel=2,
                    )
                    break
                raise RunFolderError(
                    f"{self.metrics}: line {number} is damaged ({error}): delete that line"
                ) from error
            records.append(record)
        return records

    def save_embeddings(self, embeddings: np.ndarray, labels: np.ndarray) -> None:
        """Write the evaluation embeddings and their labels to embeddings.npz atomically."""

        def write(temp: str) -> None:
            with open(temp, "wb") as file:
                np.savez(file, embeddings=embeddings, labels=labels)

        atomic_write(self.embeddings, write)

    def load_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """The embeddings and labels of embeddings.npz; a missing or damaged file raises
        `RunFolderError` naming it."""
        if not self.embeddings.is_file():
            raise RunFolderError(
                f"{self.embeddings} is missing: the run has not finished an evaluation; "
                f"continue it with `deepmetric train --resume {self.root}`"
            )
        try:
            with np.load(self.embeddings, allow_pickle=False) as data:
                embeddings, labels = data["embeddings"], data["labels"]
        except FILE_READ_ERRORS as error:
            reason = error_reason(error)
            raise RunFolderError(
                f"{self.embeddings} is damaged ({reason}): write it again with `deepmetric "
                f"embed {self.root} DATA --out {self.embeddings} --force`"
            ) from error
        if embeddings.ndim != 2 or labels.shape != (len(embeddings),):
            raise RunFolderError(
                f"{self.embeddings} holds embeddings {embeddings.shape} and labels "
                f"{labels.shape}, not (N, D) and (N,): write it again with deepmetric embed"
            )
        return embeddings, labels


def read_class_names(path: Path) -> list[str]:
    """The JSON list of class names at ``path``; a damaged file raises `RunFolderError`."""
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise RunFolderError(
            f"{path} is damaged ({error}): delete it (labels are then shown as numbers) or "
            "write it again"
        ) from error
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RunFolderError(f"{path} must hold a JSON list of strings: delete it or fix it")
    return names


class MetricsLog:
    """Appends records to metrics.jsonl and, when tensorboard is installed, to TensorBoard.

    Each record is one ``write`` of its whole line to a file opened for appending, then
    fsynced, so a crash leaves at most one torn last line, which `RunFolder.history` drops.
    On resume from step ``resume_step`` the records of later steps (written after the
    checkpoint, before the interruption) are dropped, so the log reads as one run.
    """

    def __init__(self, run: RunFolder, resume_step: int | None = None) -> None:
        self.path = run.metrics
        if resume_step is not None:
            kept = [r for r in run.history() if r["step"] <= resume_step]
            run.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.writer = _summary_writer(run.tensorboard, resume_step)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a dict with "event", "epoch", "step" and numbers)."""
        line = (json.dumps(record) + "\n").encode("utf-8")
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            written = 0
            while written < len(line):  # os.write may write less than asked
                written += os.write(descriptor, line[written:])
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("event", "epoch", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['event']}/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (metrics.jsonl is closed after every record)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _summary_writer(folder: Path, resume_step: int | None) -> Any:
    """A TensorBoard SummaryWriter, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    purge = None if resume_step is None else resume_step + 1
    return SummaryWriter(str(folder), purge_step=purge)
