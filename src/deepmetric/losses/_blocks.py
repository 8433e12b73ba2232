"""What the losses on the (N, M) distance matrix share besides the block engine.

The block iteration and gradient accumulation live in `deepmetric.blocks` (`Sweep`); the
positive and negative pairs in `deepmetric.pairwise` (`Relation`). Here: the pairs of a loss
call (`PairSets`: from labels, label sets, relevance or mined tuples), masked reductions
(`masked_logsumexp`, `masked_softmax`), and the reduction and stats of a swept sum
(`finish_sum`, `StructuredStats`). `setup_pairs` checks a call and returns all three.

Losses whose terms depend on other rows (a column's hardest negative, the global histogram)
take two sweeps: `Sweep.blocks` without gradient to collect the statistics, then `Sweep.run`
on a surrogate whose gradient equals the loss gradient, or `Sweep.run_gradient` with the
gradient in D written out. Double backward through a `Sweep` is refused (see
`deepmetric.blocks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from deepmetric.blocks import Sweep, replaying
from deepmetric.distances import BaseDistance
from deepmetric.losses.base import LossInputs, prepare_inputs
from deepmetric.losses.reduction import reduction_normaliser
from deepmetric.pairwise import Relation, build_relation, drop_same_items
from deepmetric.tuples import PositiveLists, triplets_to_pairs


def masked_logsumexp(values: Tensor, mask: Tensor | None, dim: int = 1, add_one: bool = False):
    """log(sum over `mask` of exp(values)) along `dim`; log(1 + sum ...) with `add_one`.

    The masked maximum is subtracted before exponentiating, so scales such as 1 / 0.01 stay
    finite in float32. A row with no entry gives -inf (0 with `add_one`) and zero gradient.
    """
    masked = values if mask is None else values.masked_fill(~mask, -math.inf)
    top = masked.amax(dim=dim, keepdim=True)
    if add_one:
        top = top.clamp_min(0)
    top = torch.where(torch.isfinite(top), top, 0).detach()
    total = (masked - top).exp_().sum(dim=dim)
    top = top.squeeze(dim)
    if add_one:
        return (total + torch.exp(-top)).log() + top
    empty = total == 0
    return torch.where(empty, -math.inf, total.clamp_min(torch.finfo(total.dtype).tiny).log() + top)


def masked_softmax(values: Tensor, mask: Tensor) -> Tensor:
    """Softmax along dim 1 restricted to `mask`; rows with no entry are all zero."""
    masked = values.masked_fill(~mask, -math.inf)
    top = masked.amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0)
    weights = (masked - top).exp_()
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)


def lists_from_pairs(anchor: Tensor, other: Tensor, num_query: int, num_ref: int) -> PositiveLists:
    """Per-anchor lists of the distinct pairs (anchor[i], other[i]), padded as `PositiveLists`."""
    device = anchor.device
    keys = torch.unique(anchor * num_ref + other)
    rows, cols = keys // num_ref, keys % num_ref
    count = torch.bincount(rows, minlength=num_query)
    width = max(int(count.max()) if len(keys) else 0, 1)
    starts = torch.cumsum(count, 0) - count
    rank = torch.arange(len(keys), device=device) - starts[rows]
    index = torch.zeros(num_query, width, dtype=torch.long, device=device)
    valid = torch.zeros(num_query, width, dtype=torch.bool, device=device)
    index[rows, rank] = cols
    valid[rows, rank] = True
    return PositiveLists(index, valid, count)


class PairSets:
    """Positive and negative (anchor, reference) pairs of a loss call, by blocks of anchors.

    From labels: the `deepmetric.pairwise.Relation` of the call (positives share the anchor's
    label, negatives carry another, pairs of the same item are neither). From an
    `indices_tuple`: the mined pairs (a1, p) are the positives and (a2, n) the negatives;
    triplets (a, p, n) give (a, p) and (a, n); mined pairs of the same item (equal ids) are
    dropped. A pair listed several times counts once.
    """

    def __init__(self, inputs: LossInputs) -> None:
        num_query, num_ref = len(inputs.embeddings), len(inputs.ref_emb)
        self.num_ref = num_ref
        self._negatives: Tensor | None = None
        self.relation: Relation | None = None
        if inputs.indices_tuple is None:
            self.relation = build_relation(
                inputs.labels,
                inputs.ref_labels,
                num_ref,
                inputs.ids,
                inputs.ref_is_query,
                inputs.relevance,
            )
            return
        pairs = inputs.indices_tuple
        if len(pairs) == 3:
            pairs = triplets_to_pairs(*pairs)
        anchor1, positive, anchor2, negative = drop_same_items(pairs, inputs.ids)
        self._positives = lists_from_pairs(anchor1, positive, num_query, num_ref)
        self._negatives = torch.zeros(
            num_query, num_ref, dtype=torch.bool, device=inputs.embeddings.device
        )
        self._negatives[anchor2, negative] = True

    @property
    def positives(self) -> PositiveLists:
        """The positive lists of every anchor (N, K)."""
        return self._positives if self.relation is None else self.relation.positives

    def positive_rows(self, rows: slice) -> PositiveLists:
        """The positive lists of the anchors in `rows`."""
        if self.relation is not None:
            return self.relation.positive_rows(rows)
        lists = self._positives
        return PositiveLists(lists.index[rows], lists.valid[rows], lists.count[rows])

    def positive_weights(self, rows: slice, lists: PositiveLists) -> Tensor:
        """(R, K) weights of the listed positives (`Relation.positive_weights`; 1 for mined)."""
        if self.relation is not None:
            return self.relation.positive_weights(rows, lists)
        return lists.valid.to(torch.float64)

    def negative_mask(self, rows: slice) -> Tensor:
        """(rows, M) mask of the negative pairs of the anchors in `rows`."""
        if self._negatives is not None:
            return self._negatives[rows]
        return self.relation.negative_mask(rows)

    def non_negative_mask(self, rows: slice) -> Tensor:
        """(rows, M) mask of the entries that are not negative pairs (~negative_mask)."""
        if self._negatives is not None:
            return ~self._negatives[rows]
        return self.relation.non_negative_mask(rows)

    def positive_mask(self, rows: slice) -> Tensor:
        """(rows, M) dense mask of the positive pairs of the anchors in `rows`."""
        if self.relation is not None:
            return self.relation.positive_mask(rows)
        lists = self.positive_rows(rows)
        index = lists.index.masked_fill(~lists.valid, self.num_ref)
        mask = torch.zeros(len(index), self.num_ref + 1, dtype=torch.bool, device=index.device)
        return mask.scatter_(1, index, True)[:, : self.num_ref]

    def pair_mask(self, rows: slice) -> Tensor | None:
        """(rows, M) mask of every pair, positive or negative; None when that is every entry."""
        if self._negatives is not None:
            return self.positive_mask(rows) | self._negatives[rows]
        return self.relation.pair_mask(rows)


def reduction_scale(reduction: str, num_terms: Tensor, num_active: Tensor) -> Tensor:
    """The factor that turns a sum of terms into `reduction` ("mean", "nonzero_mean", "sum")."""
    if reduction == "sum":
        return torch.ones((), dtype=torch.float64, device=num_terms.device)
    count = num_active if reduction == "nonzero_mean" else num_terms
    return 1.0 / count.clamp_min(1).double()


@dataclass(frozen=True)
class StructuredStats:
    """Counts from the last call of a structured loss (0-dim tensors).

    `num_terms` is the number of terms the loss averages over with reduction="mean" (positive
    pairs, anchors or pairs, as each loss documents); `num_active` how many of them are > 0.
    For the losses that support local-anchor mode, `loss_sum` is the sum of the terms (with
    its gradient) and `normaliser` the count the reduction divided it by (before clamping at
    1; 1 for "sum"): loss = loss_sum / max(normaliser, 1).
    """

    num_terms: Tensor
    num_active: Tensor
    loss_sum: Tensor | None = None
    normaliser: Tensor | None = None


def prepare_call(
    embeddings: Tensor,
    labels: Tensor | None,
    indices_tuple: tuple | None,
    ref_emb: Tensor | None,
    ref_labels: Tensor | None,
    ids: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None),
) -> LossInputs:
    """`prepare_inputs` of a loss call whose keyword-only `query_ids`, `ref_ids`, `relevance`
    are passed on as `ids`."""
    query_ids, ref_ids, relevance = ids
    return prepare_inputs(
        embeddings,
        labels,
        indices_tuple,
        ref_emb,
        ref_labels,
        query_ids=query_ids,
        ref_ids=ref_ids,
        relevance=relevance,
    )


def setup_pairs(
    embeddings: Tensor,
    labels: Tensor | None,
    indices_tuple: tuple | None,
    ref_emb: Tensor | None,
    ref_labels: Tensor | None,
    distance: BaseDistance,
    params: tuple[Tensor, ...] = (),
    ids: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None),
) -> tuple[LossInputs, PairSets, Sweep]:
    """Checked inputs, their pair sets and a sweep over their distance matrix; `ids` is
    (query_ids, ref_ids, relevance)."""
    inputs = prepare_call(embeddings, labels, indices_tuple, ref_emb, ref_labels, ids)
    pairs = PairSets(inputs)
    sweep = Sweep(inputs.embeddings, inputs.ref_emb, inputs.ref_is_query, distance, params)
    return inputs, pairs, sweep


def finish_sum(
    inputs: LossInputs,
    sweep: Sweep,
    total: Tensor,
    counts: Tensor,
    reduction: str,
    return_stats: bool,
    extra: Tensor | None = None,
) -> Tensor | tuple[Tensor, StructuredStats]:
    """The loss from a swept sum of terms: reduced, plus `extra`, in the input dtype; the
    stats carry `loss_sum` and `normaliser` when there is no `extra` term."""
    scale = reduction_scale(reduction, counts[0], counts[1]).to(total.dtype)
    loss = sweep.result(total * scale, scale)
    if extra is not None:
        loss = loss + extra
    loss = inputs.finish(loss)
    if not return_stats:
        return loss
    loss_sum = normaliser = None
    if extra is None:
        loss_sum = inputs.finish(sweep.result(total))
        normaliser = reduction_normaliser(reduction, counts[0], counts[1])
    stats = StructuredStats(counts[0], counts[1], loss_sum, normaliser)
    return loss, stats


def count_terms(counts: Tensor, terms: Tensor, is_term: Tensor) -> None:
    """Add the number of terms and of non-zero terms to `counts` (2,) (not while the sweep
    replays its objectives for a second derivative: the counts are those of the call)."""
    if replaying():
        return
    with torch.no_grad():
        counts[0] += is_term.sum()
        counts[1] += ((terms > 0) & is_term).sum()


def new_counts(inputs: LossInputs) -> Tensor:
    """Zero counts of (terms, active terms)."""
    return torch.zeros(2, dtype=torch.long, device=inputs.embeddings.device)
