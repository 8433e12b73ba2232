"""Build the pieces a config names: loss, miner and distance by class name, the optimiser
with separate learning rates for the loss's parameters, and the learning-rate schedule."""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import pkgutil
from types import ModuleType
from typing import Any

import torch
from torch import nn

from deepmetric import distances, losses, miners
from deepmetric.losses.param_groups import param_groups
from deepmetric.training.errors import ConfigError

__all__ = [
    "build_distance",
    "build_loss",
    "build_miner",
    "build_optimizer",
    "build_scheduler",
    "check_components",
    "check_params",
    "resolve_class",
]

AUTO_ARGUMENTS = ("num_classes", "embedding_size")
"""Loss arguments the trainer fills in from the data and the model."""


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


def check_params(kind: str, cls: type, params: dict[str, Any]) -> None:
    """Raise a ConfigError naming any key of ``params`` that ``cls`` does not accept."""
    accepted = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    for key in params:
        if key in ("distance", *AUTO_ARGUMENTS) and key in accepted:
            raise ConfigError(
                f"{kind}.params.{key} is set by the trainer; "
                + (f"use {kind}.distance=<class name>" if key == "distance" else "remove it")
            )
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.5)
            hint = f"; did you mean {kind}.params.{close[0]}?" if close else ""
            raise ConfigError(
                f"{cls.__name__} has no argument {key!r} ({kind}.params.{key}){hint}. "
                f"Its arguments: {', '.join(accepted)}"
            )


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
    check_params("loss", resolve_class("loss", loss), loss_params)
    if miner is not None:
        check_params("miner", resolve_class("miner", miner), miner_params)
    elif miner_params:
        raise ConfigError("miner.params is set but miner.name is null: name a miner or drop them")
    for distance in (loss_distance, miner_distance):
        if distance is not None:
            resolve_class("distance", distance)
    check_optimizer(optimizer)


def build_distance(name: str | None) -> distances.BaseDistance | None:
    """The distance class ``name`` built with its defaults, or None."""
    return None if name is None else resolve_class("distance", name)()


def build_loss(
    name: str, params: dict[str, Any], distance: str | None, num_classes: int, embedding_dim: int
) -> nn.Module:
    """The loss ``name`` with ``params``; num_classes and embedding_size filled in if needed."""
    cls = resolve_class("loss", name)
    check_params("loss", cls, params)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = dict(params)
    auto = {"num_classes": num_classes, "embedding_size": embedding_dim}
    kwargs.update({key: value for key, value in auto.items() if key in accepted})
    if distance is not None:
        kwargs["distance"] = build_distance(distance)
    return cls(**kwargs)


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
