"""The errors of the training pipeline: each message names the problem and the fix."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "RunFolderError", "TrainingDivergedError"]


class ConfigError(ValueError):
    """A config key or value that is not valid (unknown key, wrong type, changed on resume)."""


class CheckpointError(ValueError):
    """A checkpoint that does not fit: another model shape, a damaged file, no checkpoint."""


class RunFolderError(ValueError):
    """A run folder file that is missing or damaged (embeddings.npz, index.npz, the log)."""


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite during training (the message says at which step)."""
