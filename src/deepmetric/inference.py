"""After training: load a model from a checkpoint, embed data sets, index and evaluate them.

The trainer uses these helpers for its evaluations, and the command line for ``evaluate``,
``embed``, ``index`` and ``search``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from deepmetric.index import NeighbourIndex
from deepmetric.metrics import evaluate
from deepmetric.models import build_model

if TYPE_CHECKING:
    from deepmetric.training.config import Config, EvalConfig

# deepmetric.training imports this module, so its modules are imported where they are used:
# that way `import deepmetric.inference` works first as well as after `deepmetric.training`.

__all__ = ["build_index", "embed", "evaluate_embeddings", "load_model"]


def embed(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: torch.dtype = torch.float32,
) -> np.ndarray:
    """The model's embeddings of every item of ``dataset``, as a float32 array (N, D)."""
    from deepmetric.training.data import gather

    device = torch.device(device)
    was_training = model.training
    model.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            x = gather(dataset, np.arange(start, min(start + batch_size, len(dataset))))
            with torch.autocast(device.type, precision, enabled=precision != torch.float32):
                chunks.append(model(x.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(chunks).numpy()


def evaluate_embeddings(
    embeddings: np.ndarray, labels: np.ndarray, config: EvalConfig
) -> dict[str, float]:
    """The metrics of ``config`` for embeddings of one split (each item queries the rest)."""
    return evaluate(
        embeddings, labels, metrics=config.metrics, k=config.k, distance=config.distance
    )


def build_index(embeddings: np.ndarray, labels: np.ndarray, distance: str) -> NeighbourIndex:
    """An exact index over ``embeddings``: squared L2, or inner product of unit vectors."""
    if distance == "cosine":
        embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    index = NeighbourIndex(metric="ip" if distance == "cosine" else "l2")
    index.add(embeddings, labels=labels)
    return index


def load_model(
    path: str | Path, config: Config | None = None
) -> tuple[nn.Module, Config, tuple[int, ...]]:
    """The model of a checkpoint file (in eval mode), its config and the shape of one input.

    ``config`` defaults to the one stored in the checkpoint; a config whose model has
    another shape raises `CheckpointError` naming each tensor that does not fit.
    """
    from deepmetric.training.checkpoint import load_checkpoint, load_state
    from deepmetric.training.config import load_config

    checkpoint = load_checkpoint(path)
    if config is None:
        config = load_config(base=checkpoint["config"])
    input_shape = tuple(checkpoint["input_shape"])
    model = build_model(
        config.model.name,
        input_shape,
        config.model.embedding_dim,
        hidden_dims=config.model.hidden_dims,
        channels=config.model.channels,
        normalize=config.model.normalize,
        dropout=config.model.dropout,
    )
    load_state(model, checkpoint["model"], "model", str(path))
    return model.eval(), config, input_shape
