"""The run folder: where a training run keeps its config, log, checkpoints and results.

RUN/
  config.yaml          the resolved config (every key)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deepmetric.training.checkpoint import atomic_write
from deepmetric.training.config import Config, config_diff, load_config
from deepmetric.training.errors import ConfigError

__all__ = ["MetricsLog", "RunFolder"]


@dataclass(frozen=True)
class RunFolder:
    """The paths of a run folder, and reading and writing its small files."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
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
        return load_config(base=yaml.safe_load(self.config.read_text(encoding="utf-8")))

    def start(self, config: Config, resume: bool) -> None:
        """Write config.yaml for a new run, or check that a resumed run's config is unchanged."""
        if resume:
            changed = config_diff(self.read_config(), config)
            if changed:
                raise ConfigError(
                    f"cannot resume {self.root}: its config changed:\n  "
                    + "\n  ".join(changed)
                    + f"\nResume with the run's own config (deepmetric train --resume {self.root}"
                    " without --config or overrides), or start a new run with --run-dir"
                )
            for temp in self.root.rglob(".*.tmp"):  # left by a kill during a write
                temp.unlink()
            return
        if self.config.exists():
            raise ConfigError(
                f"{self.root} already holds a run: continue it with "
                f"`deepmetric train --resume {self.root}`, or choose another --run-dir"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_text(self.config, config.to_yaml())

    def write_text(self, path: Path, text: str) -> None:
        """Write ``text`` to ``path`` atomically."""
        atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))

    def write_json(self, path: Path, value: Any) -> None:
        """Write ``value`` as indented JSON to ``path`` atomically."""
        self.write_text(path, json.dumps(value, indent=2) + "\n")

    def history(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl, in order."""
        if not self.metrics.is_file():
            return []
        lines = self.metrics.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def save_embeddings(self, embeddings: np.ndarray, labels: np.ndarray) -> None:
        """Write the evaluation embeddings and their labels to embeddings.npz atomically."""

        def write(temp: str) -> None:
            with open(temp, "wb") as file:
                np.savez(file, embeddings=embeddings, labels=labels)

        atomic_write(self.embeddings, write)

    def load_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """The embeddings and labels of embeddings.npz."""
        with np.load(self.embeddings, allow_pickle=False) as data:
            return data["embeddings"], data["labels"]


class MetricsLog:
    """Appends records to metrics.jsonl and, when tensorboard is installed, to TensorBoard.

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
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("event", "epoch", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['event']}/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _summary_writer(folder: Path, resume_step: int | None) -> Any:
    """A TensorBoard SummaryWriter, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    purge = None if resume_step is None else resume_step + 1
    return SummaryWriter(str(folder), purge_step=purge)
