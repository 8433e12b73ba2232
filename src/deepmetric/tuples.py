"""Index tuples of pairs and triplets, and the padded per-anchor column lists.

Which pairs are positive or negative is decided in `deepmetric.pairwise` (`Relation`).

Index tuples follow pytorch-metric-learning: triplets are `(anchor, positive, negative)`,
pairs are `(anchor1, positive, anchor2, negative)`; anchors index the batch, positives and
negatives index the reference set (the batch itself unless `ref_emb` is given). Miners return
a `MinedTuple`, a plain tuple that also remembers which reference set it indexes, so a loss
given another reference set can refuse it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class IndicesOutOfRangeError(ValueError, IndexError):
    """An index tuple that points outside the batch or the reference set: a ValueError (a bad
    argument) that is also an IndexError (what indexing would have raised)."""


class MinedTuple(tuple):
    """A tuple of index tensors plus `reference_key`, the identity of the set they index."""

    reference_key: tuple

    def __new__(cls, tensors: tuple[Tensor, ...], reference_key: tuple) -> MinedTuple:
        obj = super().__new__(cls, tensors)
        obj.reference_key = reference_key
        return obj


def reference_key(ref_emb: Tensor | None) -> tuple:
    """Identity of a reference set: the batch itself, or a given tensor (storage and shape)."""
    if ref_emb is None:
        return ("batch",)
    return (
        "ref_emb",
        ref_emb.untyped_storage().data_ptr(),
        ref_emb.storage_offset(),
        tuple(ref_emb.shape),
    )


class PositiveLists(NamedTuple):
    """Each anchor's columns (positives, or non-negatives) as a padded (N, K) index table.

    `index[i, j]` is a reference index where `valid[i, j]`, and 0 (a harmless placeholder for
    `gather`) elsewhere. `count[i]` is the number of valid entries of row i.
    """

    index: Tensor
    valid: Tensor
    count: Tensor


def check_indices_tuple(
    indices_tuple: tuple, num_query: int, num_ref: int, ref_key: tuple
) -> tuple[Tensor, ...]:
    """Validate a pair or triplet index tuple against the query and reference set sizes."""
    if not isinstance(indices_tuple, tuple) or len(indices_tuple) not in (3, 4):
        arity = len(indices_tuple) if isinstance(indices_tuple, (tuple, list)) else "?"
        raise ValueError(
            "indices_tuple must be a tuple of 3 tensors (anchor, positive, negative) or 4 "
            f"tensors (anchor1, positive, anchor2, negative); got {type(indices_tuple).__name__} "
            f"of length {arity}"
        )
    mined_key = getattr(indices_tuple, "reference_key", None)
    if mined_key is not None and mined_key != ref_key:
        raise ValueError(
            "indices_tuple was mined against a different reference set than the loss was given "
            "(ref_emb differs between the miner call and the loss call); pass the same ref_emb "
            "and ref_labels to both, or neither"
        )
    checked = []
    for position, indices in enumerate(indices_tuple):
        if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.is_floating_point():
            raise TypeError(f"indices_tuple[{position}] must be a 1-D integer tensor")
        checked.append(indices.long())
    groups = [checked] if len(checked) == 3 else [checked[:2], checked[2:]]
    if any(len({len(t) for t in group}) > 1 for group in groups):
        raise ValueError(
            "indices_tuple tensors that describe the same pairs or triplets must have equal "
            f"lengths, got {[len(t) for t in checked]}"
        )
    query_positions = (0,) if len(checked) == 3 else (0, 2)
    for position, indices in enumerate(checked):
        is_query = position in query_positions
        bound = num_query if is_query else num_ref
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= bound):
            target = "the batch (embeddings)" if is_query else "the reference set"
            raise IndicesOutOfRangeError(
                f"indices_tuple[{position}] has indices outside [0, {bound}); "
                f"it must index {target}"
            )
    return tuple(checked)


def triplets_to_pairs(anchor: Tensor, positive: Tensor, negative: Tensor) -> tuple[Tensor, ...]:
    """(a, p, n) triplets as pairs (a, p, a, n); repeated pairs are kept, once per triplet."""
    return anchor, positive, anchor, negative


def pairs_to_triplets(
    anchor1: Tensor, positive: Tensor, anchor2: Tensor, negative: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Every (a, p, n) such that (a, p) is a given positive pair and (a, n) a given negative pair.

    Vectorised: negative pairs are grouped by anchor and each positive pair is repeated once
    per negative pair of its anchor; the output size is the number of such triplets.
    """
    if len(anchor1) == 0 or len(anchor2) == 0:
        empty = anchor1.new_empty(0)
        return empty, empty, empty
    num_anchors = int(max(anchor1.max(), anchor2.max())) + 1
    order = torch.argsort(anchor2, stable=True)
    negatives_by_anchor = negative[order]
    counts = torch.bincount(anchor2, minlength=num_anchors)
    starts = torch.cumsum(counts, 0) - counts
    repeats = counts[anchor1]
    total = int(repeats.sum())
    pair_of_triplet = torch.repeat_interleave(
        torch.arange(len(anchor1), device=anchor1.device), repeats
    )
    offset = (
        torch.arange(total, device=anchor1.device)
        - (torch.cumsum(repeats, 0) - repeats)[pair_of_triplet]
    )
    anchors = anchor1[pair_of_triplet]
    return anchors, positive[pair_of_triplet], negatives_by_anchor[starts[anchors] + offset]


__all__ = [
    "IndicesOutOfRangeError",
    "MinedTuple",
    "PositiveLists",
    "check_indices_tuple",
    "pairs_to_triplets",
    "reference_key",
    "triplets_to_pairs",
]
