"""The trainer behind `deepmetric train`, readable top to bottom: build the data, model,
loss and optimiser; loop over P x K batches; evaluate each epoch; save.

Model selection is honest: every choice made during training (the best epoch, early
stopping) reads the metrics of ``eval.select_split``, by default the validation classes (a
seeded share of the training classes, never trained on). The test split (``eval.split``) is
embedded once, after the last step, by the chosen model (and by the untrained one for the
"before" column); its embeddings are the run's ``embeddings.npz`` and ``index.npz``.

Everything a run needs to continue is in ``checkpoints/last.pt``: model, loss parameters,
optimiser, schedule, gradient scaler, the sampler's epoch and position, and the random
generators. It is written atomically every ``train.checkpoint_every_steps`` steps and at
the end of each epoch, so a run killed at any moment resumes from its last checkpoint and
ends exactly as an uninterrupted run would. Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at
the end of the current step before stopping, so no progress is lost.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from deepmetric.data import LabeledDataset
from deepmetric.inference import build_index, embed, evaluate_embeddings, load_model
from deepmetric.metrics import format_table
from deepmetric.report import ImageSource, write_report
from deepmetric.samplers import DistributedPKBatchSampler
from deepmetric.training import distributed_run
from deepmetric.training.checkpoint import (
    atomic_write,
    load_checkpoint,
    load_state,
    save_checkpoint,
)
from deepmetric.training.components import (
    build_loss,
    build_miner,
    build_model_from_config,
    build_optimizer,
    build_scheduler,
    warmup_length,
)
from deepmetric.training.config import Config
from deepmetric.training.data import gather, images_of, load_split, validation_classes
from deepmetric.training.errors import ConfigError, RunFolderError, TrainingDivergedError
from deepmetric.training.run_folder import MetricsLog, RunFolder

__all__ = [
    "TrainState",
    "build_index",
    "cpu_has_bf16",
    "embed",
    "evaluate_embeddings",
    "load_model",
    "pick_device",
    "pick_precision",
    "report_run",
    "seed_everything",
    "train",
]

CHECKPOINT_VERSION = 1


@dataclass
class TrainState:
    """Where training stands: what a checkpoint needs besides the modules' states."""

    epoch: int = 0
    """Epochs completed."""
    batch: int = 0
    """Batches completed in the current epoch."""
    step: int = 0
    """Optimiser steps completed in total."""
    before: dict[str, float] | None = None
    """Metrics of the untrained model on the selection split."""
    best: dict[str, float] | None = None
    """Selection-split metrics of the best evaluation so far (by eval.select_metric)."""
    best_epoch: int | None = None
    evals_without_improvement: int = 0
    seconds: float = 0.0
    """Training time so far, over all sessions of the run."""
    epoch_losses: list[float] = field(default_factory=list)
    """Losses of the current epoch's steps so far."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the legacy generator user code may use)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """ "auto" is cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA GPU is available: use cpu or auto")
    return device


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), so autocast helps."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype. "auto" is bf16 on GPUs that support it (else fp16) and on CPUs
    with native bf16 (about 1.7x faster for the default CNN, same MAP@R), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def report_run(run: RunFolder, config: Config, images: ImageSource | None = None) -> Path:
    """Write the report of a finished run (report.html and plots/) from its files."""
    if not run.summary.is_file():
        raise RunFolderError(
            f"{run.summary} is missing: the run has not finished; continue it with "
            f"`deepmetric train --resume {run.root}`"
        )
    embeddings, labels = run.load_embeddings()
    return write_report(
        run.root,
        history=run.history(),
        summary=json.loads(run.summary.read_text(encoding="utf-8")),
        embeddings=embeddings,
        labels=labels,
        images=images,
        class_names=run.load_class_names(),
        config_text=run.config.read_text(encoding="utf-8"),
        distance=config.eval.distance,
        projection=config.report.projection,
        map_classes=config.report.map_classes,
        queries=config.report.queries,
        neighbours=config.report.neighbours,
    )


class _StopRequest:
    """While active, SIGINT and SIGTERM set ``requested`` instead of stopping at once, so the
    loop can save a checkpoint at the end of the current step; a second signal stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    restart: bool = False,
    quiet: bool = False,
    on_step: Callable[[TrainState], None] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and fill the run folder ``run_dir``; return the summary.

    The summary holds the metrics of the untrained model ("before", when
    eval.before_training) and of the best epoch ("after"), the best epoch and timings.
    With ``resume`` the run continues from ``checkpoints/last.pt``; its config must be
    the one it was started with, and a run without last.pt is refused (`CheckpointError`)
    unless ``restart``, which starts it again from step 0 and keeps the old log as
    metrics-N.jsonl. A new run that fails before its first step removes what it wrote, so
    the same call can be made again. ``on_step(state)`` is called after each step (tests
    use it to interrupt a run). Ctrl-C saves a checkpoint and raises KeyboardInterrupt.
    ``train.threads`` applies while training; torch's thread count is restored after.
    """
    threads = torch.get_num_threads()
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    try:
        session = distributed_run.start_session(config.train.device)  # torchrun's processes
        try:
            quiet = quiet or not session.is_main  # rank 0 alone prints and writes
            return _train(config, RunFolder(run_dir), resume, restart, quiet, on_step)
        finally:
            session.close()
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Parts:
    """What a run is built from: data, sampler, model, loss, miner, optimiser, schedule."""

    config: Config
    device: torch.device
    precision: torch.dtype
    train_set: LabeledDataset
    select_split: str
    """The split every choice reads: eval.select_split, or train where "val" has no classes."""
    select_set: LabeledDataset
    eval_set: LabeledDataset
    """The final split (eval.split): embedded after training only."""
    classes: np.ndarray
    """The training labels, sorted: a batch's labels become their positions (0..C-1)."""
    sampler: DistributedPKBatchSampler
    input_shape: tuple[int, ...]
    model: nn.Module
    loss_fn: nn.Module
    miner: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    initial_model: dict[str, torch.Tensor]
    """The untrained weights (the build is seeded, so a resumed run rebuilds the same)."""

    def checkpoint(self, state: TrainState) -> dict[str, Any]:
        """Everything a run needs to continue from ``state``."""
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "input_shape": list(self.input_shape),
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": asdict(state),
            "rng": distributed_run.rng_states(),
        }

    def restore(self, path: Path) -> TrainState:
        """Load the checkpoint ``path`` into the parts; return its training state."""
        saved = load_checkpoint(path)
        load_state(self.model, saved["model"], "model", str(path))
        load_state(self.loss_fn, saved["loss"], "loss", str(path))
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        distributed_run.restore_rng_states(saved["rng"])
        return TrainState(**saved["state"])

    def evaluate(self, dataset: LabeledDataset) -> tuple[dict[str, float], np.ndarray]:
        """The metrics and embeddings of ``dataset`` (the selection or the final split)."""
        embeddings = distributed_run.embed_sharded(
            self.model,
            dataset,
            batch_size=self.config.eval.batch_size,
            device=self.device,
            precision=self.precision,
        )
        return evaluate_embeddings(embeddings, dataset.labels, self.config.eval), embeddings


def _train(
    config: Config,
    run: RunFolder,
    resume: bool,
    restart: bool,
    quiet: bool,
    on_step: Callable[[TrainState], None] | None,
) -> dict[str, Any]:
    """The body of `train`: check the folder, build, start or resume, loop, finish."""
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    if resume:
        run.check_resume(config, restart)
    elif distributed_run.is_main():  # rank 0 alone touches the run folder
        run.check_new()
    parts = _build(config)  # nothing is written before the config and data proved usable
    fresh = not resume or not run.last.is_file()
    owned: list[Path] = []
    if not resume and distributed_run.is_main():
        owned = run.start(config, parts.eval_set.class_names)
    elif distributed_run.is_main():
        run.reopen(parts.eval_set.class_names)
        if fresh:
            moved = run.archive_logs()
            say(f"restarting {run.root} from step 0" + "".join(f"; kept {p}" for p in moved))
    state, log = TrainState(), None
    try:
        if fresh:
            log = distributed_run.metrics_log(run)
            if config.eval.before_training:
                state.before, _ = parts.evaluate(parts.select_set)
                split = parts.select_split
                log.write({"event": "eval", "split": split, "epoch": 0, "step": 0, **state.before})
                say(format_table(state.before, title=f"before training ({split} split)"))
        else:
            state = parts.restore(run.last)
            log = distributed_run.metrics_log(run, resume_step=state.step)
            say(f"resumed {run.root} at epoch {state.epoch + 1}, step {state.step}")
        _loop(parts, state, log, run, say, quiet, on_step)
    except BaseException:
        if log is not None:
            log.close()
        if not resume and state.step == 0:
            run.discard(owned)  # failed before its first step: leave nothing behind
        raise
    return _finish(parts, state, run, say)


def _build(config: Config) -> _Parts:
    """Seed, then build the data, sampler, model, loss, miner, optimiser and schedule in a
    fixed order (the random generators' use must not change between runs)."""
    seed_everything(config.train.seed)
    device = pick_device(config.train.device)
    precision = pick_precision(config.train.precision, device)

    # Data: P x K batches over the training classes; evaluation on held-out classes.
    train_set = load_split(config.data, "train", train=True)
    eval_set = load_split(config.data, config.eval.split)
    select_split = config.eval.select_split
    if select_split == "val" and not validation_classes(config.data):
        select_split = "train"  # too few training classes to hold any out
    select_set = load_split(config.data, select_split)
    classes = np.unique(train_set.labels)  # labels become 0..C-1 for classifier losses
    if config.train.classes_per_batch > len(classes):
        raise ConfigError(
            f"train.classes_per_batch={config.train.classes_per_batch} but the training split "
            f"of {config.data.name} has {len(classes)} classes: set train.classes_per_batch="
            f"{len(classes)} or fewer"
        )
    largest_k = max(config.eval.k) if "recall@k" in config.eval.metrics else 0
    for split, dataset in ((config.eval.split, eval_set), (select_split, select_set)):
        if largest_k > len(dataset) - 1:
            raise ConfigError(
                f"eval.k={config.eval.k} asks for Recall@{largest_k} but the {split} split has "
                f"{len(dataset)} items (each query has {len(dataset) - 1} others): set eval.k "
                f"to values of at most {len(dataset) - 1}"
            )
    try:
        sampler = DistributedPKBatchSampler(
            train_set.labels,
            config.train.classes_per_batch,
            config.train.samples_per_class,
            num_batches=config.train.batches_per_epoch,
            seed=config.train.seed,
        )
    except ValueError as error:
        raise ConfigError(f"train.classes_per_batch / train.samples_per_class: {error}") from error
    input_shape = tuple(gather(train_set, [0]).shape[1:])

    # Model, loss (its proxies or class weights have their own learning rate), miner,
    # optimiser, schedule and the gradient scaler of fp16.
    try:
        model = build_model_from_config(config.model, input_shape).to(device)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from error
    try:
        loss_fn = build_loss(
            config.loss.name,
            config.loss.params,
            config.loss.distance,
            num_classes=len(classes),
            embedding_dim=config.model.embedding_dim,
        ).to(device)
    except (ValueError, TypeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"loss.name={config.loss.name}: {error}") from error
    miner = build_miner(config.miner.name, config.miner.params, config.miner.distance)
    try:
        optimizer = build_optimizer(
            config.optimizer.name,
            model,
            loss_fn,
            lr=config.optimizer.lr,
            loss_lr=config.optimizer.loss_lr,
            weight_decay=config.optimizer.weight_decay,
            loss_weight_decay=config.optimizer.loss_weight_decay,
            momentum=config.optimizer.momentum,
        )
    except ValueError as error:  # torch.optim's own checks, e.g. SGD's momentum
        raise ConfigError(f"optimizer.name={config.optimizer.name}: {error}") from error
    # torchrun: DDP, the loss over the global batch; in one process all stay as they are
    model, loss_fn, miner = distributed_run.wrap_for_training(model, loss_fn, miner)
    initial_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    total_steps = config.train.epochs * len(sampler)
    warmup = warmup_length(
        config.optimizer.warmup_steps, config.optimizer.warmup_ratio, total_steps
    )
    scheduler = build_scheduler(optimizer, config.optimizer.schedule, warmup, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    return _Parts(
        config,
        device,
        precision,
        train_set,
        select_split,
        select_set,
        eval_set,
        classes,
        sampler,
        input_shape,
        model,
        loss_fn,
        miner,
        optimizer,
        scheduler,
        scaler,
        initial_model,
    )


def _loop(
    parts: _Parts,
    state: TrainState,
    log: MetricsLog,
    run: RunFolder,
    say: Callable[[str], None],
    quiet: bool,
    on_step: Callable[[TrainState], None] | None,
) -> None:
    """The epochs: one optimiser step per P x K batch, evaluation after each epoch."""
    config = parts.config
    started = time.perf_counter() - state.seconds

    def save_last() -> None:
        state.seconds = time.perf_counter() - started
        checkpoint = parts.checkpoint(state)  # on every rank: it gathers their random states
        if distributed_run.is_main():
            save_checkpoint(checkpoint, run.last)

    def interrupted() -> None:
        log.close()
        say(f"interrupted at step {state.step}; saved {run.last}")
        say(f"continue with: deepmetric train --resume {run.root}")
        raise KeyboardInterrupt

    with _StopRequest() as stop:
        while state.epoch < config.train.epochs:
            parts.sampler.set_epoch(state.epoch)
            batches = list(parts.sampler)
            parts.model.train()
            progress = tqdm(
                total=len(batches),
                initial=state.batch,
                desc=f"epoch {state.epoch + 1}/{config.train.epochs}",
                disable=quiet or not sys.stderr.isatty(),
                leave=False,
            )
            interval_start, interval_samples = time.perf_counter(), 0
            for batch in batches[state.batch :]:
                loss = _step(parts, batch, state)
                state.step += 1
                state.batch += 1
                state.epoch_losses.append(loss)
                interval_samples += (  # the global batch (under torchrun: all ranks')
                    parts.sampler.classes_per_batch * parts.sampler.samples_per_class
                )
                progress.update()

                if state.step % config.train.log_every_steps == 0:
                    elapsed = time.perf_counter() - interval_start
                    record = {
                        "event": "train",
                        "epoch": state.epoch + 1,
                        "step": state.step,
                        "loss": float(np.mean(state.epoch_losses[-config.train.log_every_steps :])),
                        "lr": parts.optimizer.param_groups[0]["lr"],
                        "samples_per_second": interval_samples / max(elapsed, 1e-9),
                    }
                    log.write(record)
                    progress.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        samples_s=f"{record['samples_per_second']:.0f}",
                    )
                    interval_start, interval_samples = time.perf_counter(), 0
                # Mid-epoch checkpoints; the last batch of an epoch is saved after evaluation.
                every = config.train.checkpoint_every_steps
                stopping = distributed_run.any_rank(stop.requested)  # all ranks stop together
                if state.batch < len(batches):
                    if stopping or (every and state.step % every == 0):
                        save_last()
                    if stopping:
                        progress.close()
                        interrupted()
                if on_step is not None:
                    on_step(state)
            progress.close()
            _end_epoch(parts, state, log, run, say, started)
            save_last()
            if distributed_run.any_rank(stop.requested):
                interrupted()
    log.close()


def _step(parts: _Parts, batch: list[int], state: TrainState) -> float:
    """One optimiser step on ``batch``; return its loss."""
    x = gather(parts.train_set, batch).to(parts.device)
    labels = np.searchsorted(parts.classes, parts.train_set.labels[batch])
    y = torch.from_numpy(labels).to(parts.device)
    enabled = parts.precision != torch.float32
    with torch.autocast(parts.device.type, parts.precision, enabled=enabled):
        embeddings = parts.model(x)
    embeddings = embeddings.float()  # losses and miners see float32
    indices_tuple = None if parts.miner is None else parts.miner(embeddings, y)
    loss = parts.loss_fn(embeddings, y, indices_tuple)
    if not torch.isfinite(loss):
        raise TrainingDivergedError(
            f"the loss is {loss.item()} at step {state.step + 1}: lower optimizer.lr, set "
            "optimizer.grad_clip_norm, or use train.precision=fp32"
        )
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    if parts.config.optimizer.grad_clip_norm is not None:
        parts.scaler.unscale_(parts.optimizer)
        parameters = [p for group in parts.optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(parameters, parts.config.optimizer.grad_clip_norm)
    scale = parts.scaler.get_scale()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    if parts.scaler.get_scale() >= scale:  # fp16 skips steps with inf gradients
        parts.scheduler.step()
    return loss.item()


def _end_epoch(
    parts: _Parts,
    state: TrainState,
    log: MetricsLog,
    run: RunFolder,
    say: Callable[[str], None],
    started: float,
) -> None:
    """End of an epoch: evaluate the selection split, keep the best model, decide on early
    stopping."""
    config = parts.config
    state.epoch += 1
    state.batch = 0
    train_loss = float(np.mean(state.epoch_losses)) if state.epoch_losses else math.nan
    state.epoch_losses = []
    last_epoch = state.epoch == config.train.epochs
    if state.epoch % config.eval.every_epochs == 0 or last_epoch:
        metrics, _ = parts.evaluate(parts.select_set)
        state.seconds = time.perf_counter() - started
        log.write(
            {
                "event": "eval",
                "split": parts.select_split,
                "epoch": state.epoch,
                "step": state.step,
                "train_loss": train_loss,
                "seconds": state.seconds,
                **metrics,
            }
        )
        say(
            f"epoch {state.epoch}/{config.train.epochs}: loss {train_loss:.4f}, "
            + ", ".join(f"{k} {metrics[k]:.4f}" for k in ("recall@1", "map@r") if k in metrics)
            + f" ({state.seconds:.0f} s)"
        )
        select = config.eval.select_metric
        if state.best is None or metrics[select] > state.best[select]:
            state.best, state.best_epoch = metrics, state.epoch
            state.evals_without_improvement = 0
            checkpoint = parts.checkpoint(state)
            if distributed_run.is_main():
                save_checkpoint(checkpoint, run.best)
        else:
            state.evals_without_improvement += 1
    patience = config.train.early_stopping_patience
    if patience is not None and state.evals_without_improvement >= patience:
        select = config.eval.select_metric
        say(f"early stopping: {select} did not improve in {patience} evaluations")
        state.epoch = config.train.epochs


def _finish(
    parts: _Parts, state: TrainState, run: RunFolder, say: Callable[[str], None]
) -> dict[str, Any]:
    """The final evaluation, once: the chosen model (best.pt) and, for the "before" column,
    the untrained one embed the final split (eval.split); then its embeddings, an index over
    them, the summary and the report. The summary says which split each number comes from."""
    config = parts.config
    before = None
    if config.eval.before_training:
        parts.model.load_state_dict(parts.initial_model)
        before, _ = parts.evaluate(parts.eval_set)
    load_state(parts.model, load_checkpoint(run.best)["model"], "model", str(run.best))
    after, embeddings = parts.evaluate(parts.eval_set)
    select = parts.select_split
    summary = {
        "split": config.eval.split,
        "before": before,
        "after": after,
        "selection": {
            "split": select,
            "asked": config.eval.select_split,
            "metric": config.eval.select_metric,
            "classes": len(np.unique(parts.select_set.labels)),
            "reads_test": select == "test",
            "before": state.before,
            "best": state.best,
        },
        "train_classes": len(parts.classes),
        "best_epoch": state.best_epoch,
        "steps": state.step,
        "train_seconds": state.seconds,
        "device": str(parts.device),
        "precision": str(parts.precision).removeprefix("torch."),
    }
    if not distributed_run.is_main():
        return summary  # rank 0 writes the results
    run.save_embeddings(embeddings, parts.eval_set.labels)
    index = build_index(embeddings, parts.eval_set.labels, config.eval.distance)
    atomic_write(run.index, index.save)
    run.write_json(run.summary, summary)
    if config.report.enabled:
        eval_set = parts.eval_set
        report_run(run, config, images=lambda indices: images_of(eval_set, indices))
        say(f"report: {run.report}")
    return summary
