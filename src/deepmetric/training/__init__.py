"""Training: the config, checkpoints, the run folder and the trainer behind `deepmetric train`.

Digits has 5 training classes, so a batch holds at most 5 classes (P); one thread is
fastest for so small a model:

>>> import tempfile
>>> from deepmetric.training import load_config, train
>>> config = load_config(
...     overrides=["data.name=digits", "model.name=mlp", "train.epochs=1",
...                "train.classes_per_batch=5", "train.samples_per_class=4",
...                "train.threads=1"]
... )
>>> summary = train(config, tempfile.mkdtemp() + "/digits", quiet=True)
>>> summary["after"]["map@r"] > summary["before"]["map@r"]
True
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
