"""The errors of the training pipeline: each message names the problem and the fix."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError"]


class ConfigError(ValueError):
    """A config key or value that is not valid (unknown key, wrong type, changed on resume)."""


class CheckpointError(ValueError):
    """A checkpoint that does not fit: another model shape, a damaged file, no checkpoint."""
