"""Siamese and triplet networks (seed 003): one shared-weight encoder applied to each member.

For pre-built (offline) pairs or triplets, the members are embedded by the same encoder and
stacked into one batch with an `indices_tuple` that says which rows form each pair or
triplet, so every loss of the library accepts them through its usual call:

    embeddings, indices = TripletNetwork(encoder)(anchors, positives, negatives)
    loss = TripletMarginLoss()(embeddings, indices_tuple=indices)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def pair_indices(num_pairs: int, same: Tensor, device: torch.device | None = None) -> tuple:
    """Index tuple (a1, p, a2, n) for a batch stacked as [first members; second members].

    `same[i]` says whether pair i is a positive pair.
    """
    first = torch.arange(num_pairs, device=device)
    same = same.to(device=device, dtype=torch.bool)
    return first[same], first[same] + num_pairs, first[~same], first[~same] + num_pairs


def triplet_indices(num_triplets: int, device: torch.device | None = None) -> tuple:
    """Index tuple (a, p, n) for a batch stacked as [anchors; positives; negatives]."""
    first = torch.arange(num_triplets, device=device)
    return first, first + num_triplets, first + 2 * num_triplets


class SiameseNetwork(nn.Module):
    """A shared encoder applied to both members of pre-built pairs (Bromley et al. 1993).

    forward(first, second, same) returns the stacked embeddings (2B, D) and the pair
    index tuple for a pair loss such as `ContrastiveLoss`.

    Example:
        >>> net = SiameseNetwork(nn.Linear(4, 2))
        >>> emb, idx = net(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([1, 0, 1]))
        >>> emb.shape, [len(i) for i in idx]
        (torch.Size([6, 2]), [2, 2, 1, 1])
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, first: Tensor, second: Tensor, same: Tensor) -> tuple[Tensor, tuple]:
        if len(first) != len(second) or len(same) != len(first):
            raise ValueError(
                f"first, second and same must have equal lengths, got {len(first)}, "
                f"{len(second)}, {len(same)}"
            )
        embeddings = self.encoder(torch.cat([first, second]))
        return embeddings, pair_indices(len(first), same, embeddings.device)


class TripletNetwork(nn.Module):
    """A shared encoder applied to anchors, positives and negatives (Hoffer & Ailon 2015).

    forward(anchor, positive, negative) returns the stacked embeddings (3B, D) and the
    triplet index tuple for `TripletMarginLoss` (or any loss accepting triplets).

    Example:
        >>> net = TripletNetwork(nn.Linear(4, 2))
        >>> emb, idx = net(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4))
        >>> emb.shape
        torch.Size([9, 2])
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> tuple[Tensor, tuple]:
        if not len(anchor) == len(positive) == len(negative):
            raise ValueError(
                f"anchor, positive and negative must have equal lengths, got {len(anchor)}, "
                f"{len(positive)}, {len(negative)}"
            )
        embeddings = self.encoder(torch.cat([anchor, positive, negative]))
        return embeddings, triplet_indices(len(anchor), embeddings.device)


__all__ = ["SiameseNetwork", "TripletNetwork", "pair_indices", "triplet_indices"]
