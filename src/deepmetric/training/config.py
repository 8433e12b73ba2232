"""The training config: nested dataclasses, read from YAML and `key=value` overrides.

Sections: data, model, loss, miner, optimizer, train, eval, report. Every key has a default,
so an empty config is the default recipe (Kanji-Fonts-32, small CNN, normalised softmax).
Keys are written ``section.key`` on the command line (``train.epochs=3``); the keyword
arguments of the loss and miner classes go under ``loss.params`` and ``miner.params``
(``loss.params.temperature=0.1``). A key that does not exist raises a `ConfigError` that
suggests the closest valid key.

    >>> config = load_config(overrides=["train.epochs=3", "loss.params.temperature=0.1"])
    >>> config.train.epochs, config.loss.params["temperature"]
    (3, 0.1)
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepmetric.metrics import METRIC_NAMES
from deepmetric.training.components import check_components
from deepmetric.training.errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "MinerConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ReportConfig",
    "TrainConfig",
    "config_diff",
    "config_help",
    "load_config",
]


@dataclass
class DataConfig:
    """Which data set to train and evaluate on, and how much of it."""

    name: str = "kanji_fonts"
    """kanji_fonts (bundled), digits (scikit-learn), image_folder or feature_table."""
    path: str | None = None
    """The folder (image_folder) or table file (feature_table); unused for bundled sets."""
    train_classes: int | None = None
    """Train classes drawn at random (seeded by data.seed) from those not held out for
    validation; null keeps every class."""
    test_classes: int | None = 300
    """Test classes drawn at random (seeded by data.seed); null keeps every class."""
    samples_per_class: int | None = None
    """Samples kept per class (the first ones); null keeps every sample."""
    val_share: float = 0.2
    """Share of the training split's classes held out as the validation split (drawn with
    data.seed, never trained on); 0: none. Fewer than 2 held-out classes: none."""
    seed: int = 0
    """Seed of the class subsample and of the validation classes."""
    image_size: int = 32
    """image_folder: side in pixels that images are resized to."""
    image_mode: str = "L"
    """image_folder: L (grey) or RGB."""
    label_column: str = "label"
    """feature_table: the column that holds the class labels (a number: its index)."""
    augment_shift: int = 2
    """Random shift of training images (not vectors) by up to this many pixels (0: none)."""


@dataclass
class ModelConfig:
    """The embedding network (deepmetric.models)."""

    name: str = "cnn"
    """cnn (images) or mlp (any input, flattened)."""
    embedding_dim: int = 64
    """Width D of the embeddings."""
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    """cnn: output channels of each conv block (each block halves the image side)."""
    hidden_dims: list[int] = field(default_factory=lambda: [256])
    """mlp: widths of the hidden layers."""
    normalize: bool = True
    """L2-normalise the embeddings."""
    dropout: float = 0.0
    """mlp: dropout after each hidden layer."""


@dataclass
class LossConfig:
    """The loss, by class name in deepmetric.losses, and its keyword arguments."""

    name: str = "NormalizedSoftmaxLoss"
    """A loss class of deepmetric.losses (e.g. TripletMarginLoss, ProxyAnchorLoss)."""
    params: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.1})
    """Keyword arguments of the loss (num_classes, embedding_size filled in where required, or
    set to auto); another loss.name starts from {}."""
    distance: str | None = None
    """A class of deepmetric.distances passed as distance=; null: the loss's default."""


@dataclass
class MinerConfig:
    """The miner, by class name in deepmetric.miners (null: no miner, the loss sees all)."""

    name: str | None = None
    """A miner class of deepmetric.miners (e.g. BatchHardMiner), or null."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the miner."""
    distance: str | None = None
    """A class of deepmetric.distances passed as distance=; null: the miner's default."""


@dataclass
class OptimizerConfig:
    """The optimiser, its learning rates and schedule, and gradient clipping."""

    name: str = "AdamW"
    """A class of torch.optim (AdamW, Adam, SGD, ...)."""
    lr: float = 2e-3
    """Learning rate of the model."""
    loss_lr: float | None = 2e-2
    """Learning rate of the loss's parameters (proxies, class weights); null: optimizer.lr."""
    weight_decay: float = 1e-4
    """Weight decay of the model."""
    loss_weight_decay: float = 0.0
    """Weight decay of the loss's parameters."""
    momentum: float = 0.9
    """Optimisers that take a momentum (SGD, RMSprop): its value."""
    schedule: str = "cosine"
    """Learning-rate schedule over all steps: constant or cosine (to 0)."""
    warmup_ratio: float = 0.2
    """Share of the run's steps spent on a linear warm-up of the learning rates from 0 before
    the schedule. Adam's first steps move every parameter by about the learning rate whatever
    its gradient, which turns the class vectors of all classes absent from the batch the same
    way; with many classes the embeddings then stay collapsed (docs/benchmark.md)."""
    warmup_steps: int | None = None
    """Steps of warm-up; overrides optimizer.warmup_ratio when set (0: none)."""
    grad_clip_norm: float | None = 5.0
    """Clip the global gradient norm to this value; null: no clipping."""


@dataclass
class TrainConfig:
    """The training loop: batches, epochs, precision, checkpoints, seeds."""

    epochs: int = 2
    """Passes over the training set."""
    classes_per_batch: int = 64
    """P: classes per batch."""
    samples_per_class: int = 2
    """K: samples of each class per batch."""
    batches_per_epoch: int | None = None
    """Batches per epoch; null: enough to see every training sample about once."""
    seed: int = 0
    """Seed of torch, numpy, random, the weight init and the batch sampler."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    precision: str = "auto"
    """auto, fp32, bf16 or fp16 (autocast); auto: bf16 where the GPU or CPU has it, else fp32."""
    threads: int | None = None
    """CPU threads for torch (torch.set_num_threads); null: torch's default."""
    checkpoint_every_steps: int = 50
    """Write checkpoints/last.pt every this many steps within an epoch (0: epoch ends only)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improving eval.select_metric; null: never."""
    log_every_steps: int = 10
    """Write the training loss to metrics.jsonl every this many steps."""


@dataclass
class EvalConfig:
    """Evaluation of the embeddings on the held-out classes (deepmetric.metrics.evaluate)."""

    split: str = "test"
    """Split of the final evaluation (summary before/after), embeddings.npz and index.npz:
    test (unseen classes), train or all; embedded once, after training, by the chosen model."""
    select_split: str = "val"
    """Split that every choice reads (best epoch, early stopping, sweeps): val (held-out
    training classes; train when there are none), train, or test (flagged in the report)."""
    metrics: list[str] = field(
        default_factory=lambda: ["recall@k", "precision@1", "r_precision", "map@r", "nmi"]
    )
    """Metric names of deepmetric.metrics.evaluate."""
    k: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """The K values of Recall@K."""
    distance: str = "euclidean"
    """euclidean or cosine."""
    select_metric: str = "map@r"
    """The metric that picks the best checkpoint and drives early stopping."""
    every_epochs: int = 1
    """Evaluate after every this many epochs (and always after the last)."""
    before_training: bool = True
    """Evaluate the untrained model too (the 'before' column of the table)."""
    batch_size: int = 512
    """Batch size for embedding."""


@dataclass
class ReportConfig:
    """The report written at the end of training (report.html and PNG plots)."""

    enabled: bool = True
    """Write the report."""
    projection: str = "pca"
    """2-D map of the test embeddings: pca or tsne."""
    map_classes: int = 12
    """Classes shown in the 2-D map."""
    queries: int = 8
    """Example queries shown in the neighbour grid."""
    neighbours: int = 8
    """Neighbours shown per example query."""


@dataclass
class Config:
    """The whole training config (see docs/cli.md for every key)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    miner: MinerConfig = field(default_factory=MinerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (what config.yaml holds)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML text, sections in order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("kanji_fonts", "digits", "image_folder", "feature_table"),
    "data.image_mode": ("L", "RGB"),
    "model.name": ("cnn", "mlp"),
    "optimizer.schedule": ("constant", "cosine"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "eval.split": ("train", "test", "all"),
    "eval.select_split": ("val", "train", "test"),
    "eval.distance": ("euclidean", "cosine"),
    "report.projection": ("pca", "tsne"),
}
FREE_FORM = ("params",)
"""Fields whose keys are the keyword arguments of a class, checked when it is built."""


def _fields(section: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section)}


def _all_keys() -> list[str]:
    config = Config()
    return [f"{s}.{k}" for s in _fields(config) for k in _fields(getattr(config, s))]


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown config key {key!r}{hint} (`deepmetric train --help` lists every key)"
    )


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` converted to the type ``annotation`` of config key ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
        origin = typing.get_origin(annotation)
    if value is None:
        raise ConfigError(f"{key} cannot be null; give a value like its default")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, e.g. {key}=[1,2], got {value!r}")
        return [_coerce(key, v, item_type) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, e.g. {key}={{a: 1}}, got {value!r}")
        return dict(value)
    if annotation in (int, float) and isinstance(value, str):
        try:
            value = annotation(value.strip())  # "1e-3", which YAML reads as a string
        except ValueError:
            pass
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        text = str(value)
        if key in CHOICES and text not in CHOICES[key]:
            raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}, got {text!r}")
        return text
    raise TypeError(f"config key {key} has an unsupported type {annotation!r}")


def _set(config: Config, key: str, value: Any) -> None:
    """Set ``key`` ("section.name" or "section.params.arg") to ``value``, type-checked."""
    parts = key.split(".")
    sections = _fields(config)
    if parts[0] not in sections or len(parts) < 2:
        raise _unknown_key(key, _all_keys())
    section = getattr(config, parts[0])
    fields = _fields(section)
    if parts[1] not in fields:
        raise _unknown_key(key, _all_keys())
    if parts[1] in FREE_FORM and len(parts) == 3:
        getattr(section, parts[1])[parts[2]] = value
        return
    if len(parts) != 2:
        raise _unknown_key(key, _all_keys())
    hints = typing.get_type_hints(type(section))
    setattr(section, parts[1], _coerce(key, value, hints[parts[1]]))


def _flatten(mapping: dict[str, Any]) -> dict[str, Any]:
    """Nested sections to ``{"section.key": value}``."""
    return {
        f"{section}.{name}": value
        for section, values in mapping.items()
        for name, value in values.items()
    }


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"key=value"``; the value is read as YAML (numbers, true, null, [1, 2])."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Build a `Config`: defaults, then ``base`` (a nested dict), the YAML file at ``path``,
    then each ``key=value`` of ``overrides``.

    The default ``loss.params`` (the recipe's temperature) belong to the default loss: when
    ``loss.name`` names another loss, only the params given for it are kept.
    Raises `ConfigError` for an unknown key (with the closest valid key) or a value of the
    wrong type.
    """
    config = Config()
    params_replaced, params_set = False, {}
    layers: list[dict[str, Any]] = []
    if base is not None:
        layers.append(base)
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist: pass an existing YAML file")
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            reason = " ".join(str(error).split())
            raise ConfigError(f"{path} is not valid YAML ({reason}): fix the file") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (data:, model:, ...)")
        layers.append(loaded)
    for layer in layers:
        for section, values in layer.items():
            if not isinstance(values, dict):
                raise _unknown_key(str(section), list(_fields(config)))
            for name, value in values.items():
                _set(config, f"{section}.{name}", value)
                params_replaced |= f"{section}.{name}" == "loss.params"
    for text in overrides or []:
        key, value = parse_override(text)
        _set(config, key, value)
        params_replaced |= key == "loss.params"
        if key.startswith("loss.params."):
            params_set[key.removeprefix("loss.params.")] = value
    if not params_replaced and config.loss.name != LossConfig.name:
        config.loss.params = params_set
    _check_values(config)
    return config


def _check_values(config: Config) -> None:
    """Range checks that the types alone do not catch."""
    positive = {
        "train.epochs": config.train.epochs,
        "train.classes_per_batch": config.train.classes_per_batch,
        "train.samples_per_class": config.train.samples_per_class,
        "train.log_every_steps": config.train.log_every_steps,
        "eval.every_epochs": config.eval.every_epochs,
        "eval.batch_size": config.eval.batch_size,
        "model.embedding_dim": config.model.embedding_dim,
        "optimizer.lr": config.optimizer.lr,
        "data.image_size": config.data.image_size,
        "report.map_classes": config.report.map_classes,
        "report.queries": config.report.queries,
        "report.neighbours": config.report.neighbours,
    }
    optional = {
        "data.train_classes": config.data.train_classes,
        "data.test_classes": config.data.test_classes,
        "data.samples_per_class": config.data.samples_per_class,
        "train.batches_per_epoch": config.train.batches_per_epoch,
        "train.threads": config.train.threads,
        "optimizer.loss_lr": config.optimizer.loss_lr,
        "optimizer.grad_clip_norm": config.optimizer.grad_clip_norm,
    }
    positive.update({key: value for key, value in optional.items() if value is not None})
    positive.update({f"model.channels[{i}]": c for i, c in enumerate(config.model.channels)})
    positive.update({f"model.hidden_dims[{i}]": d for i, d in enumerate(config.model.hidden_dims)})
    positive.update({f"eval.k[{i}]": k for i, k in enumerate(config.eval.k)})
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    not_negative = {
        "data.augment_shift": config.data.augment_shift,
        "optimizer.weight_decay": config.optimizer.weight_decay,
        "optimizer.loss_weight_decay": config.optimizer.loss_weight_decay,
        "optimizer.momentum": config.optimizer.momentum,
        "optimizer.warmup_steps": config.optimizer.warmup_steps or 0,
    }
    for key, value in not_negative.items():
        if not value >= 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if not 0 <= config.optimizer.warmup_ratio < 1:
        raise ConfigError(
            f"optimizer.warmup_ratio must be in [0, 1), got {config.optimizer.warmup_ratio}"
        )
    if not 0 <= config.data.val_share < 1:
        raise ConfigError(f"data.val_share must be in [0, 1), got {config.data.val_share}")
    if not 0 <= config.model.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {config.model.dropout}")
    if not config.model.channels:
        raise ConfigError("model.channels must list at least one block width, e.g. [32, 64]")
    patience = config.train.early_stopping_patience
    if patience is not None and patience < 1:
        raise ConfigError(f"train.early_stopping_patience must be >= 1 or null, got {patience}")
    if config.train.checkpoint_every_steps < 0:
        raise ConfigError("train.checkpoint_every_steps must be >= 0 (0: at epoch ends only)")
    if config.data.name in ("image_folder", "feature_table") and not config.data.path:
        raise ConfigError(f"data.name={config.data.name} needs data.path=<folder or file>")
    _check_metrics(config.eval)
    check_components(
        config.loss.name,
        config.loss.params,
        config.loss.distance,
        config.miner.name,
        config.miner.params,
        config.miner.distance,
        config.optimizer.name,
    )


def _check_metrics(config: EvalConfig) -> None:
    """Metric names that evaluate() knows, and a select_metric that one of them produces."""
    produced = {"num_queries", "num_skipped"}
    for name in config.metrics:
        if name not in METRIC_NAMES and not re.fullmatch(r"recall@[1-9]\d*", name):
            close = difflib.get_close_matches(name, METRIC_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"eval.metrics has an unknown metric {name!r}{hint} "
                f"Valid names: {', '.join(METRIC_NAMES)}, recall@<K>"
            )
        produced |= {f"recall@{k}" for k in config.k} if name == "recall@k" else {name}
    if config.select_metric not in produced and not {"diagnostics", "verification"} & produced:
        raise ConfigError(
            f"eval.select_metric={config.select_metric!r} is not among the evaluated metrics "
            f"({', '.join(sorted(produced))}): add it to eval.metrics or choose one of them"
        )


def config_diff(old: Config, new: Config) -> list[str]:
    """The keys whose values differ, as ``"key: old -> new"`` lines."""
    before, after = _flatten(old.to_dict()), _flatten(new.to_dict())
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


def config_help() -> str:
    """Every config key with its default and meaning, for ``deepmetric train --help``."""
    config = Config()
    lines = []
    for section_name in _fields(config):
        section = getattr(config, section_name)
        lines.append(f"{section_name}:")
        docs = _field_docs(type(section))
        for name in _fields(section):
            default = yaml.safe_dump(getattr(section, name), default_flow_style=True).strip()
            default = default.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  {section_name}.{name}={default}")
            lines.append("      " + " ".join(docs.get(name, "").split()))
    return "\n".join(lines)


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its one-line documentation)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr):
            if isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = after.value.value  # type: ignore[attr-defined]
    return docs
