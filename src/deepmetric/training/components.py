"""Build the pieces a config names: loss, miner and distance by class name, the optimiser
with separate learning rates for the loss's parameters, and the learning-rate schedule."""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import pkgutil
import re
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deepmetric import distances, losses, miners
from deepmetric.losses.param_groups import param_groups
from deepmetric.models import build_model
from deepmetric.training.errors import ConfigError

if TYPE_CHECKING:  # config.py imports this module
    from deepmetric.training.config import ModelConfig

__all__ = [
    "build_distance",
    "build_loss",
    "build_miner",
    "build_model_from_config",
    "build_optimizer",
    "build_scheduler",
    "check_components",
    "check_params",
    "loss_arguments",
    "resolve_class",
    "warmup_length",
]

AUTO = "auto"
"""The value of ``loss.params.num_classes`` / ``loss.params.embedding_size`` that asks the
trainer to fill the argument from the data (the training classes) and the model
(``model.embedding_dim``)."""
AUTO_ARGUMENTS = ("num_classes", "embedding_size")
"""Loss arguments the trainer can fill in from the data and the model."""


def _public_classes(package: ModuleType, base: type) -> dict[str, type]:
    """Public subclasses of ``base`` in ``package`` and, for a package, its submodules."""
    modules = [package]
    if hasattr(package, "__path__"):
        modules += [
            importlib.import_module(f"{package.__name__}.{info.name}")
            for info in pkgutil.iter_modules(package.__path__)
            if not info.name.startswith("_")
        ]
    found: dict[str, type] = {}
    for module in modules:
        for name, value in vars(module).items():
            if (
                not name.startswith("_")
                and inspect.isclass(value)
                and issubclass(value, base)
                and value is not base
                and not inspect.isabstract(value)
            ):
                found.setdefault(name, value)
    return found


def _closest(name: str, valid: list[str]) -> str:
    """A " did you mean ...?" hint for a misspelt ``name`` (case-insensitive first)."""
    same = [v for v in valid if v.lower() == name.lower()]
    close = same or difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _registry(kind: str) -> dict[str, type]:
    if kind == "loss":
        return {
            name: cls
            for name, cls in _public_classes(losses, nn.Module).items()
            if name.endswith("Loss") and name not in ("MetricLoss", "ClassifierLoss")
        }
    if kind == "miner":
        return _public_classes(miners, miners.BaseMiner)
    return _public_classes(distances, distances.BaseDistance)


def resolve_class(kind: str, name: str) -> type:
    """The class called ``name`` among the losses, miners or distances (``kind``)."""
    registry = _registry(kind)
    if name in registry:
        return registry[name]
    raise ConfigError(
        f"{kind}.name={name!r} is not a {kind} of deepmetric{_closest(name, list(registry))}. "
        f"Valid names: {', '.join(sorted(registry))}"
    )


def _arguments(cls: type) -> dict[str, inspect.Parameter]:
    return {
        p.name: p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def check_params(kind: str, cls: type, params: dict[str, Any]) -> None:
    """Raise a ConfigError naming any key of ``params`` that ``cls`` does not accept.

    ``num_classes`` and ``embedding_size`` take ``auto`` (filled in by the trainer) or,
    where the class makes them optional, ``null`` (left unset); ``distance`` is set with
    ``loss.distance`` / ``miner.distance``.
    """
    accepted = _arguments(cls)
    for key, value in params.items():
        if key == "distance" and key in accepted:
            raise ConfigError(
                f"{kind}.params.distance is set by the trainer: use {kind}.distance=<class name>"
            )
        if key in AUTO_ARGUMENTS and key in accepted:
            optional = accepted[key].default is None
            if value == AUTO or (value is None and optional):
                continue
            shown = "null" if value is None else repr(value)
            raise ConfigError(
                f"{kind}.params.{key}={shown}: {key} is set by the trainer from the "
                f"{'data' if key == 'num_classes' else 'model'}: write {kind}.params.{key}="
                f"{AUTO}" + (" (or null to leave it unset)" if optional else "")
            )
        if key not in accepted:
            close = difflib.get_close_matches(key, list(accepted), n=1, cutoff=0.5)
            hint = f"; did you mean {kind}.params.{close[0]}?" if close else ""
            raise ConfigError(
                f"{cls.__name__} has no argument {key!r} ({kind}.params.{key}){hint}. "
                f"Its arguments: {', '.join(accepted)}"
            )


def loss_arguments(
    cls: type, params: dict[str, Any], num_classes: int, embedding_dim: int
) -> dict[str, Any]:
    """The keyword arguments of loss ``cls``: ``params``, with each ``auto`` replaced by the
    data's or model's value, and the required ``num_classes`` / ``embedding_size`` (no
    default) filled in when not given. Optional ones (e.g. `MarginLoss`'s per-class beta)
    are filled only when ``params`` asks for them with ``auto``."""
    accepted = _arguments(cls)
    values = {"num_classes": num_classes, "embedding_size": embedding_dim}
    kwargs = dict(params)
    for key, value in values.items():
        if key not in accepted:
            continue
        required = accepted[key].default is inspect.Parameter.empty
        if kwargs.get(key) == AUTO or (required and key not in kwargs):
            kwargs[key] = value
    return kwargs


def _trial(
    kind: str,
    name: str,
    params: dict[str, Any],
    distance: str | None,
    build: Callable[[], object],
) -> None:
    """Build a component once with placeholder sizes, so that a value it refuses (a
    hyper-parameter out of range, a distance it cannot use) is a ConfigError naming the
    config key now, not an error at the first step."""
    try:
        build()
    except (ValueError, TypeError) as error:
        reason = " ".join(str(error).split())
        named = [key for key in params if re.search(rf"\b{re.escape(key)}\b", reason)]
        if named:
            key = f"{kind}.params.{named[0]}={params[named[0]]!r}"
        elif distance is not None and "distance" in reason:
            key = f"{kind}.distance={distance}"
        else:
            key = f"{kind}.name={name}"
        raise ConfigError(f"{key}: {reason} (fix {key.split('=')[0]})") from error


def check_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` optimiser class called ``name``."""
    valid = {
        n: c
        for n, c in vars(torch.optim).items()
        if inspect.isclass(c)
        and issubclass(c, torch.optim.Optimizer)
        and c is not torch.optim.Optimizer
    }
    if name not in valid:
        raise ConfigError(
            f"optimizer.name={name!r} is not a torch.optim optimizer{_closest(name, list(valid))}"
        )
    return valid[name]


def check_components(
    loss: str,
    loss_params: dict[str, Any],
    loss_distance: str | None,
    miner: str | None,
    miner_params: dict[str, Any],
    miner_distance: str | None,
    optimizer: str,
) -> None:
    """Raise a ConfigError if a named class does not exist or does not take its params."""
    loss_cls = resolve_class("loss", loss)
    check_params("loss", loss_cls, loss_params)
    if miner is not None:
        check_params("miner", resolve_class("miner", miner), miner_params)
    elif miner_params:
        raise ConfigError("miner.params is set but miner.name is null: name a miner or drop them")
    for kind, name, distance in (("loss", loss, loss_distance), ("miner", miner, miner_distance)):
        if distance is not None:
            resolve_class("distance", distance)
            cls = loss_cls if kind == "loss" else resolve_class("miner", name or "")
            if name is not None and "distance" not in _arguments(cls):
                raise ConfigError(
                    f"{kind}.distance={distance} but {name} takes no distance (it fixes its "
                    f"own): set {kind}.distance=null"
                )
    check_optimizer(optimizer)
    _trial(
        "loss",
        loss,
        loss_params,
        loss_distance,
        lambda: build_loss(loss, loss_params, loss_distance, num_classes=2, embedding_dim=2),
    )
    if miner is not None:
        _trial(
            "miner",
            miner,
            miner_params,
            miner_distance,
            lambda: build_miner(miner, miner_params, miner_distance),
        )


def build_model_from_config(model: ModelConfig, input_shape: tuple[int, ...]) -> nn.Module:
    """The embedder that the ``model`` section of a config describes, for inputs of
    ``input_shape`` (one item, without the batch dimension)."""
    return build_model(
        model.name,
        input_shape,
        model.embedding_dim,
        hidden_dims=model.hidden_dims,
        channels=model.channels,
        normalize=model.normalize,
        dropout=model.dropout,
    )


def build_distance(name: str | None) -> distances.BaseDistance | None:
    """The distance class ``name`` built with its defaults, or None."""
    return None if name is None else resolve_class("distance", name)()


def build_loss(
    name: str, params: dict[str, Any], distance: str | None, num_classes: int, embedding_dim: int
) -> nn.Module:
    """The loss ``name`` with ``params``; num_classes and embedding_size filled in where the
    loss requires them or ``params`` sets them to ``auto`` (see `loss_arguments`).

    >>> build_loss("MarginLoss", {}, None, num_classes=10, embedding_dim=64).beta.shape
    torch.Size([])
    >>> loss = build_loss("MarginLoss", {"num_classes": "auto"}, None, 10, 64)
    >>> loss.beta.shape
    torch.Size([10])
    """
    cls = resolve_class("loss", name)
    check_params("loss", cls, params)
    kwargs = loss_arguments(cls, params, num_classes, embedding_dim)
    if distance is not None:
        kwargs["distance"] = build_distance(distance)
    margin = kwargs.get("margin")
    if margin == ADAPTIVE or (isinstance(margin, dict) and set(margin) == {ADAPTIVE}):
        kwargs["margin"] = adaptive_margin(cls, margin)
    return cls(**kwargs)


ADAPTIVE = "adaptive"
"""``loss.params.margin=adaptive`` (or ``{adaptive: {update_every: 50}}``): seed 000's
`AdaptiveMargin` schedule, for the losses that take one (AdditiveMarginLoss)."""


def adaptive_margin(cls: type, margin: str | dict[str, Any]) -> losses.AdaptiveMargin:
    """The `AdaptiveMargin` that ``loss.params.margin`` asks for (its keyword arguments under
    ``adaptive``).

    >>> adaptive_margin(losses.AdditiveMarginLoss, {"adaptive": {"update_every": 5}}).update_every
    5
    """
    if "AdaptiveMargin" not in str(inspect.signature(cls).parameters["margin"].annotation):
        raise ConfigError(
            f"loss.params.margin={ADAPTIVE} but {cls.__name__} takes a number as its margin: "
            "the adaptive margin is for AdditiveMarginLoss"
        )
    arguments = {} if margin == ADAPTIVE else margin[ADAPTIVE] or {}  # type: ignore[index]
    if not isinstance(arguments, dict):
        raise ConfigError(
            f"loss.params.margin={{adaptive: {arguments!r}}}: give AdaptiveMargin's keyword "
            "arguments as a mapping, e.g. {adaptive: {update_every: 50}}"
        )
    try:
        return losses.AdaptiveMargin(**arguments)
    except TypeError as error:
        raise ConfigError(f"loss.params.margin.adaptive: {error}") from error


def build_miner(name: str | None, params: dict[str, Any], distance: str | None) -> nn.Module | None:
    """The miner ``name`` with ``params``, or None when ``name`` is None."""
    if name is None:
        return None
    cls = resolve_class("miner", name)
    check_params("miner", cls, params)
    kwargs = dict(params)
    if distance is not None:
        kwargs["distance"] = build_distance(distance)
    return cls(**kwargs)


def build_optimizer(
    name: str,
    model: nn.Module,
    loss: nn.Module,
    *,
    lr: float,
    loss_lr: float | None,
    weight_decay: float,
    loss_weight_decay: float,
    momentum: float,
) -> torch.optim.Optimizer:
    """A ``torch.optim`` optimiser over the model's and the loss's parameters (two groups)."""
    cls = check_optimizer(name)
    groups = param_groups(
        model,
        loss,
        lr=lr,
        loss_lr=loss_lr,
        weight_decay=weight_decay,
        loss_weight_decay=loss_weight_decay,
    )
    extra = {"momentum": momentum} if "momentum" in inspect.signature(cls).parameters else {}
    return cls(groups, lr=lr, **extra)


def warmup_length(warmup_steps: int | None, warmup_ratio: float, total_steps: int) -> int:
    """Steps of warm-up: ``warmup_steps`` when given, else ``warmup_ratio`` of the run's
    ``total_steps`` (rounded).

    >>> warmup_length(None, 0.1, 870), warmup_length(0, 0.1, 870), warmup_length(None, 0.1, 4)
    (87, 0, 0)
    """
    return warmup_steps if warmup_steps is not None else round(warmup_ratio * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to 0 at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
