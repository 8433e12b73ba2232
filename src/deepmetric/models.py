"""Embedding networks: an MLP for feature vectors and a small CNN for images.

Both end in a linear embedding head and optionally L2-normalise their output, so the
embeddings lie on the unit sphere (what cosine-based losses such as the normalised softmax
expect), and both compile with ``torch.jit.script`` (for export). Any ``nn.Module`` that
maps a batch of inputs to (N, D) embeddings works with the trainer; these two are the
defaults that `deepmetric train` builds from its config.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvEmbedder", "MLPEmbedder", "build_model"]


def _check_width(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class MLPEmbedder(nn.Module):
    """A multi-layer perceptron: flatten, [Linear, BatchNorm, ReLU] per hidden layer, Linear.

    Args:
        input_dim: number of input features (inputs of any shape are flattened to it).
        embedding_dim: D, the width of the embeddings.
        hidden_dims: widths of the hidden layers (empty: a linear embedding).
        normalize: L2-normalise the embeddings (unit length).
        dropout: dropout probability after each hidden layer.

    Example:
        >>> model = MLPEmbedder(input_dim=64, embedding_dim=16, hidden_dims=(128,))
        >>> model(torch.randn(5, 1, 8, 8)).shape
        torch.Size([5, 16])
    """

    def __init__(
        self,
        input_dim: int,
        embedding_dim: int = 64,
        hidden_dims: Sequence[int] = (256,),
        normalize: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        widths = [_check_width(input_dim, "input_dim")]
        widths += [_check_width(w, "hidden_dims entries") for w in hidden_dims]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.BatchNorm1d(width_out), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], _check_width(embedding_dim, "embedding_dim"))
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        embeddings = self.head(self.body(x))
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings


class ConvEmbedder(nn.Module):
    """A small CNN: blocks of [Conv 3x3, BatchNorm, ReLU, MaxPool 2], global average pooling
    and a linear embedding head.

    Each block halves the image side, so four blocks turn a 32x32 image into 2x2 maps.

    Args:
        in_channels: channels of the input images (1 for grey, 3 for RGB).
        embedding_dim: D, the width of the embeddings.
        channels: output channels of each block; their number is the number of blocks.
        normalize: L2-normalise the embeddings (unit length).

    Example:
        >>> model = ConvEmbedder(in_channels=1, embedding_dim=32, channels=(8, 16))
        >>> model(torch.randn(4, 1, 32, 32)).shape
        torch.Size([4, 32])
    """

    def __init__(
        self,
        in_channels: int = 1,
        embedding_dim: int = 64,
        channels: Sequence[int] = (32, 64, 128, 256),
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels must list at least one block width, e.g. [32, 64]")
        widths = [_check_width(in_channels, "in_channels")]
        widths += [_check_width(c, "channels entries") for c in channels]
        blocks: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            blocks += [
                nn.Conv2d(width_in, width_out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.body = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(widths[-1], _check_width(embedding_dim, "embedding_dim"))
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:  # no f-string and no tuple(): torch.jit.script compiles this
            raise ValueError(
                "ConvEmbedder expects images of shape (N, C, H, W), got shape "
                + str(list(x.shape))
                + "; use model.name=mlp for feature vectors"
            )
        embeddings = self.head(self.body(x))
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings


def build_model(
    name: str,
    input_shape: Sequence[int],
    embedding_dim: int,
    *,
    hidden_dims: Sequence[int] = (256,),
    channels: Sequence[int] = (32, 64, 128, 256),
    normalize: bool = True,
    dropout: float = 0.0,
) -> nn.Module:
    """Build the embedder ``name`` ("mlp" or "cnn") for inputs of ``input_shape`` (one item).

    The MLP takes any input (flattened); the CNN needs images, ``input_shape`` (C, H, W).

    Example:
        >>> build_model("cnn", (1, 32, 32), 64).head.out_features
        64
    """
    if name == "mlp":
        input_dim = int(torch.Size(input_shape).numel())
        return MLPEmbedder(input_dim, embedding_dim, hidden_dims, normalize, dropout)
    if name == "cnn":
        if len(input_shape) != 3:
            raise ValueError(
                f"model.name=cnn needs image inputs (C, H, W), but the data has items of shape "
                f"{tuple(input_shape)}: use model.name=mlp for feature vectors"
            )
        return ConvEmbedder(input_shape[0], embedding_dim, channels, normalize)
    raise ValueError(f"unknown model {name!r}; choose one of ['cnn', 'mlp']")
