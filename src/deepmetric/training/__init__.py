"""Training: the config, checkpoints, the run folder and the trainer behind `deepmetric train`.

>>> from deepmetric.training import load_config, train
>>> config = load_config(overrides=["data.name=digits", "model.name=mlp", "train.epochs=1"])
>>> summary = train(config, "runs/digits")  # doctest: +SKIP
>>> summary["after"]["map@r"]  # doctest: +SKIP
"""

from __future__ import annotations

from deepmetric.training.config import Config, load_config
from deepmetric.training.errors import CheckpointError, ConfigError
from deepmetric.training.run_folder import RunFolder
from deepmetric.training.trainer import TrainState, embed, load_model, train

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "RunFolder",
    "TrainState",
    "embed",
    "load_config",
    "load_model",
    "train",
]
