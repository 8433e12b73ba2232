"""Pair and triplet losses (SPEC §2): contrastive loss and triplet margin loss.

Each loss is a function (what the tests check against the paper) and a thin module holding
the hyper-parameters and the statistics of the last call. All pairs or all triplets of the
batch are used unless `indices_tuple` selects some; with a similarity (`is_inverted`) the
inequalities are turned around, e.g. the triplet term becomes [s(a,n) - s(a,p) + margin]+.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric._validation import check_finite, check_flag, check_non_negative
from deepmetric.blocks import SWEEP_BLOCK_ELEMENTS, Sweep
from deepmetric.distances import BaseDistance, EuclideanDistance
from deepmetric.losses._blocks import prepare_call, reduction_scale, setup_pairs
from deepmetric.losses.base import MetricLoss, any_distance, checked
from deepmetric.losses.reduction import reduce_terms, reduction_normaliser
from deepmetric.pairwise import Relation, build_relation, drop_same_items
from deepmetric.triplet_counting import (
    AllTripletsDense,
    count_triplets,
    fill_same_label_,
    hinge_block,
    plain_triplet_sum,
    softplus_block,
)
from deepmetric.tuples import pairs_to_triplets


@dataclass(frozen=True)
class PairStats:
    """Counts from the last contrastive loss call (0-dim tensors).

    `loss_sum` and `normaliser` stay None: the positive and negative parts are divided by
    counts of their own, so the loss is not one sum over one count (no local-anchor mode).
    """

    num_pos_pairs: Tensor
    num_neg_pairs: Tensor
    num_active_pos_pairs: Tensor
    num_active_neg_pairs: Tensor
    loss_sum: Tensor | None = None
    normaliser: Tensor | None = None


@dataclass(frozen=True)
class TripletStats:
    """Counts from the last triplet loss call (0-dim tensors).

    With v = d(a, n) - d(a, p) (in the distance's "smaller is closer" sense): easy triplets
    have v >= margin (zero loss), semi-hard 0 <= v < margin, hard v < 0 (seed 002, FaceNet).
    `num_active` counts the triplets with a non-zero hinge (semi-hard plus hard).
    `loss_sum` is the sum of the terms (with its gradient) and `normaliser` the count the
    reduction divides it by (before clamping at 1; 1 for "sum"), for local-anchor mode.
    """

    num_triplets: Tensor
    num_active: Tensor
    num_easy: Tensor
    num_semihard: Tensor
    num_hard: Tensor
    loss_sum: Tensor | None = None
    normaliser: Tensor | None = None


def check_power(value: float, name: str) -> float:
    """`value` if it is a finite exponent >= 1; a ValueError naming `name` otherwise."""
    value = check_finite(value, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (1: hinge, 2: squared hinge), got {value}")
    return value


def _check_margin_order(pos_margin: float, neg_margin: float, distance: BaseDistance) -> None:
    """Raise unless the margins bound a band in the distance's orientation."""
    if distance.is_inverted:
        if pos_margin < neg_margin:
            raise ValueError(
                f"with a similarity, pos_margin ({pos_margin}) must be >= neg_margin "
                f"({neg_margin}): positives are pulled above pos_margin, negatives below neg_margin"
            )
    elif not 0 <= pos_margin <= neg_margin:
        raise ValueError(
            f"with a distance, need 0 <= pos_margin <= neg_margin, got pos_margin={pos_margin}, "
            f"neg_margin={neg_margin}"
        )


@checked(
    any_distance(EuclideanDistance),
    together=_check_margin_order,
    pos_margin=check_finite,
    neg_margin=check_finite,
    power=check_power,
)
def contrastive_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    power: float = 1.0,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, PairStats]:
    """Contrastive loss (Chopra et al. 2005; Hadsell et al. 2006; survey eq. 1).

        L = reduce_pos([d(a, p) - pos_margin]+^power) + reduce_neg([neg_margin - d(a, n)]+^power)

    over positive pairs (a, p) and negative pairs (a, n); each part is reduced on its own (as
    pytorch-metric-learning does), so the many negatives do not drown the few positives.
    Mined pairs (`indices_tuple`) count as listed, repeats included; their distances are
    taken alone when they are few (`listed_distances`), else from the whole matrix.
    - seed 003's unsquared form y d + (1 - y)[m - d]+: the defaults (Euclidean distance).
    - survey eq. 1, y d^2 + (1 - y)[alpha - d^2]+: `distance=SquaredEuclideanDistance()`.
    - Hadsell's squared hinge, y d^2 + (1 - y)[m - d]+^2 (up to 1/2): `power=2`.
    With a similarity the roles turn: [pos_margin - s]+ and [s - neg_margin]+.

    Args:
        pos_margin: positives closer than this cost nothing (distance units).
        neg_margin: negatives farther than this cost nothing (distance units).
        power: exponent of each hinge, >= 1.
        distance: any `BaseDistance` (default Euclidean).
        reduction: "mean", "nonzero_mean" or "sum", applied to each part. All pairs are
            one sweep over the distance matrix; with "nonzero_mean" each part's count of
            active terms must be known before its gradient: a matrix of one sweep block
            counts them in the same pass; a larger one takes the positive part on the listed
            positive pairs (`distance.pairwise_distance`, O(|P| D)) while they are few (P x K
            batches), and otherwise a first pass without gradient counts the terms.
        return_stats: also return a `PairStats`.

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> contrastive_loss(x, y, neg_margin=2.0).shape
        torch.Size([])
    """
    ids = (query_ids, ref_ids, relevance)
    if indices_tuple is None:
        inputs, pairs, sweep = setup_pairs(
            embeddings, labels, None, ref_emb, ref_labels, distance, ids=ids
        )
        hinges = _ContrastiveHinges(pos_margin, neg_margin, power, distance.sign)
        path = None
        if reduction == "nonzero_mean":  # the counts of active terms decide the path
            path = _nonzero_mean_path(sweep, inputs, pairs.relation)
        if path == "listed positives":
            loss, stats = _contrastive_nonzero_mean(sweep, pairs.relation, hinges, inputs, distance)
        else:
            loss, stats = _all_pairs_contrastive(sweep, pairs.relation, hinges, reduction, path)
        loss = inputs.finish(loss)
        return (loss, stats) if return_stats else loss
    inputs = prepare_call(embeddings, labels, indices_tuple, ref_emb, ref_labels, ids)
    pairs = inputs.indices_tuple
    if len(pairs) == 3:
        pairs = (pairs[0], pairs[1], pairs[0], pairs[2])
    pairs = drop_same_items(pairs, inputs.ids)
    pair_distance = listed_distances(
        distance, inputs.embeddings, inputs.ref_emb, len(pairs[0]) + len(pairs[2])
    )
    hinges = _ContrastiveHinges(pos_margin, neg_margin, power, distance.sign)
    pos_terms = hinges.positive_terms(pair_distance(pairs[0], pairs[1]))
    neg_terms = hinges.negative_terms(pair_distance(pairs[2], pairs[3]))
    loss = reduce_terms(pos_terms, reduction) + reduce_terms(neg_terms, reduction)
    loss = inputs.finish(loss)
    if not return_stats:
        return loss
    with torch.no_grad():
        stats = PairStats(
            num_pos_pairs=torch.tensor(pos_terms.numel()),
            num_neg_pairs=torch.tensor(neg_terms.numel()),
            num_active_pos_pairs=(pos_terms > 0).sum(),
            num_active_neg_pairs=(neg_terms > 0).sum(),
        )
    return loss, stats


MATRIX_ENTRIES_PER_PAIR = 64
"""Matrix entries a listed pair must stand for before its own distance is cheaper than the
matrix (docs/performance.md: 1,792 pairs of a 256 x 256 matrix were 45% slower listed)."""


def few_pairs(num_pairs: int, width: int, num_query: int, num_ref: int) -> bool:
    """Whether the pairs' own distances (`distance.pairwise_distance`) cost less than the
    (num_query, num_ref) distance matrix, in time and in memory: at most one pair per
    MATRIX_ENTRIES_PER_PAIR entries of the matrix (a pair's gathered rows and their scatter
    in backward cost tens of times an entry's share of the matmul), and their gathered rows
    (2 x pairs x width entries) at most half the matrix or one sweep block."""
    fast = num_pairs * MATRIX_ENTRIES_PER_PAIR <= num_query * num_ref
    small = 2 * num_pairs * width <= max(num_query * num_ref // 2, SWEEP_BLOCK_ELEMENTS)
    return fast and small


def listed_distances(
    distance: BaseDistance, query: Tensor, ref: Tensor, num_pairs: int
) -> Callable[[Tensor, Tensor], Tensor]:
    """`pair_distance(rows, cols)`: d(query[rows], ref[cols]) of listed pairs (mined tuples),
    computed for the pairs alone (`distance.pairwise_distance`, O(pairs x D)) when they are
    few (`few_pairs`: a batch-hard miner's N triplets), else read from the whole matrix
    (a matmul, O(N M))."""
    if few_pairs(num_pairs, query.shape[1], len(query), len(ref)):
        return lambda rows, cols: distance.pairwise_distance(query[rows], ref[cols])
    matrix = distance(query, ref)
    return lambda rows, cols: matrix[rows, cols]


def _all_pairs_contrastive(
    sweep: Sweep, relation: Relation, hinges, reduction: str, path: str | None
):
    """The contrastive loss over every pair as an objective of the sweep: per block, the
    positive terms read through the block's positive lists, the negative terms with the
    same-label entries zeroed by a scatter, and their gradient in D in closed form. The two
    parts have counts of their own, so the reduction's factors are needed before a block's
    gradient: for "nonzero_mean" they come from the block itself when the sweep is one
    block (`path`), else from a first pass without gradient that counts the active terms."""
    num_pos = relation.positive_count.sum()
    num_neg = relation.num_negatives.sum()
    dtype = sweep.query.dtype

    def reduction_scales(active: Tensor) -> tuple[Tensor, Tensor]:
        return (
            reduction_scale(reduction, num_pos, active[0]).to(dtype),
            reduction_scale(reduction, num_neg, active[1]).to(dtype),
        )

    active = torch.zeros(2, dtype=torch.long, device=num_pos.device)
    scales = None
    if reduction != "nonzero_mean":
        scales = reduction_scales(active)
    elif path != "one block":
        for rows, block in sweep.blocks():
            active += hinges.block(block, relation, rows, None, False)[1]
        scales = reduction_scales(active)
    counted = torch.zeros_like(active)

    def scales_of_the_block(counts: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal scales  # one block: its active terms are all of the call's
        scales = reduction_scales(counts)
        return scales

    def step(block: Tensor, rows: slice, work) -> tuple[Tensor, Tensor | None]:
        block_scales = scales_of_the_block if scales is None else scales
        value, counts, grad = hinges.block(
            block, relation, rows, block_scales, sweep.tracking, work
        )
        counted.add_(counts)
        return value, grad

    def plain(matrix: Tensor, rows: slice) -> Tensor:
        pos_sum, neg_sum = hinges.plain(matrix, relation)
        return scales[0] * pos_sum + scales[1] * neg_sum

    loss = sweep.result(sweep.run_closed_form(step, plain))
    return loss, PairStats(num_pos, num_neg, counted[0], counted[1])


def _nonzero_mean_path(sweep: Sweep, inputs, relation: Relation) -> str:
    """How the contrastive loss learns its counts of active terms for "nonzero_mean":
    "one block" (the sweep sees the whole matrix at once), "listed positives" (the positive
    pairs are few, `few_pairs`: P x K batches) or "counting pass" (one class, wide label
    sets)."""
    if sweep.one_closed_form_block:
        return "one block"
    num_pos, (num_query, width) = int(relation.positive_count.sum()), inputs.embeddings.shape
    if few_pairs(num_pos, width, num_query, len(inputs.ref_emb)):
        return "listed positives"
    return "counting pass"


def _contrastive_nonzero_mean(sweep: Sweep, relation: Relation, hinges, inputs, distance):
    """The contrastive loss with reduction="nonzero_mean" in one sweep: each part is divided
    by its own number of active terms, known only at the end. The negative part is the
    sweep's objective, its gradient scaled once the sweep has counted its active terms; the
    positive part is taken on the listed positive pairs alone (`distance.pairwise_distance`,
    plain autograd, O(|P| D)), so no pass is spent counting first."""
    num_pos = relation.positive_count.sum()
    num_neg = relation.num_negatives.sum()
    counted = torch.zeros(2, dtype=torch.long, device=num_pos.device)
    only_negatives = (sweep.query.new_zeros(()), sweep.query.new_ones(()))

    def step(block: Tensor, rows: slice, work) -> tuple[Tensor, Tensor | None]:
        value, counts, grad = hinges.block(
            block, relation, rows, only_negatives, sweep.tracking, work
        )
        counted.add_(counts)
        return value, grad

    def plain(matrix: Tensor, rows: slice) -> Tensor:
        return hinges.plain(matrix, relation)[1]

    neg_sum = sweep.run_closed_form(step, plain)
    num_active_neg = counted[1]
    neg_scale = reduction_scale("nonzero_mean", num_neg, num_active_neg).to(neg_sum.dtype)
    positives = relation.positives
    anchors = torch.arange(len(positives.index), device=num_pos.device)
    anchors = anchors.unsqueeze(1).expand_as(positives.index)[positives.valid]
    pair_distance = listed_distances(distance, inputs.embeddings, inputs.ref_emb, len(anchors))
    pos_terms = hinges.positive_terms(pair_distance(anchors, positives.index[positives.valid]))
    num_active_pos = torch.count_nonzero(pos_terms.detach())
    pos_scale = reduction_scale("nonzero_mean", num_pos, num_active_pos).to(pos_terms.dtype)
    loss = pos_terms.sum() * pos_scale + sweep.result(neg_sum * neg_scale, neg_scale)
    return loss, PairStats(num_pos, num_neg, num_active_pos, num_active_neg)


class _ContrastiveHinges:
    """The contrastive terms on a block D[rows]: [sign (D - pos_margin)]+^power at the
    positive pairs, [sign (neg_margin - D)]+^power at the negative pairs, sign = +1 for a
    distance and -1 for a similarity (`BaseDistance.sign`)."""

    def __init__(self, pos_margin: float, neg_margin: float, power: float, sign: float) -> None:
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.power, self.sign = power, sign

    def block(self, block, relation, rows, scales, with_grad, work=None):
        """(scales[0] positive sum + scales[1] negative sum (None without `scales`), (active
        positive terms, active negative terms), gradient of the value in D or None).
        `scales` may be a function of the block's counts (a sweep of one block)."""
        power, sign = self.power, self.sign
        hinge = (
            torch.sub(block, self.neg_margin) if sign < 0 else torch.rsub(block, self.neg_margin)
        )
        hinge.clamp_min_(0)
        positives, same = relation.block_lists(rows)
        fill_same_label_(hinge, *same, 0)
        grad = None
        if with_grad:  # power h^(power - 1) (the slope: 1 where h > 0 for power 1), signed
            if power == 1:
                grad = torch.gt(hinge, 0, out=work.buffer("grad", block))
            else:
                grad = torch.pow(hinge, power - 1, out=work.buffer("grad", block))
        neg_terms = hinge if power == 1 else hinge.pow_(power)
        values = block.gather(1, positives.index)
        pos_hinge = F.relu(values - self.pos_margin if sign > 0 else self.pos_margin - values)
        pos_hinge.mul_(positives.valid)
        pos_terms = pos_hinge if power == 1 else pos_hinge.pow(power)
        counts = torch.stack([torch.count_nonzero(pos_terms), torch.count_nonzero(neg_terms)])
        if callable(scales):
            scales = scales(counts)
        if scales is None:
            return None, counts, None
        value = scales[0] * pos_terms.sum() + scales[1] * neg_terms.sum()
        if with_grad:
            grad.mul_(-sign * power * scales[1])
            slope = (pos_hinge > 0) if power == 1 else pos_hinge.pow(power - 1)
            grad.scatter_add_(1, positives.index, slope * (sign * power * scales[0]))
        return value, counts, grad

    def positive_terms(self, values: Tensor) -> Tensor:
        """[sign (D - pos_margin)]+^power of positive-pair values, differentiably."""
        hinge = F.relu(self.sign * (values - self.pos_margin))
        return hinge if self.power == 1 else hinge.pow(self.power)

    def negative_terms(self, values: Tensor) -> Tensor:
        """[sign (neg_margin - D)]+^power of negative-pair values, differentiably."""
        hinge = F.relu(self.sign * (self.neg_margin - values))
        return hinge if self.power == 1 else hinge.pow(self.power)

    def plain(self, matrix: Tensor, relation: Relation) -> tuple[Tensor, Tensor]:
        """The sums over positive and negative pairs by plain differentiable steps."""
        same = relation.non_negative_mask(slice(0, relation.num_query))
        neg = self.negative_terms(matrix).masked_fill(same, 0)
        positives = relation.positives
        pos = self.positive_terms(matrix.gather(1, positives.index)) * positives.valid
        return pos.sum(), neg.sum()


@checked(
    any_distance(EuclideanDistance),
    margin=check_non_negative,
    swap=check_flag,
    smooth_loss=check_flag,
)
def triplet_margin_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 0.2,
    swap: bool = False,
    smooth_loss: bool = False,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, TripletStats]:
    """Triplet margin loss (Weinberger & Saul 2009; Schroff et al. 2015; survey eq. 2).

        L(a, p, n) = [d(a, p) - d(a, n) + margin]+

    over all triplets of the batch (a, p same label, a != p; n another label), or over the
    triplets of `indices_tuple` (each listed triplet counts; their distances alone when they
    are few, `listed_distances`, else the whole matrix). The all-triplets hinge is computed
    exactly without enumerating triplets: per anchor, each negative is compared with the positives'
    thresholds d(a, p) + margin, and the counts of active positives and negatives give the
    sum and its gradient (see `deepmetric.triplet_counting`): O(N M K) vectorised
    comparisons (O(N M log K) by `searchsorted` for large K), one row block of the distance
    matrix at a time (`deepmetric.blocks.Sweep`), O(block + N D) memory.

    `smooth_loss=True` uses log(1 + exp(d(a, p) - d(a, n) + margin)) (the soft-plus of
    Hermans et al. 2017 when margin = 0). `swap=True` replaces d(a, n) by min(d(a, n),
    d(p, n)) (Balntas et al. 2016). Both give every (p, n) of an anchor its own term and
    cost O(N K M) time by nature: one pass per positive slot over each row block, value and
    slope together (`deepmetric.triplet_counting.softplus_block`); the swap reads rows of
    the reference set's own matrix, so it works on both whole matrices in O(N M) memory
    (`deepmetric.triplet_counting.AllTripletsDense`).

    Args:
        margin: required gap between positive and negative distances, >= 0 (distance units).
        swap: use the distance anchor swap.
        smooth_loss: soft-plus instead of hinge.
        distance: any `BaseDistance` (default Euclidean).
        reduction: "mean" (over all triplets), "nonzero_mean" (over active ones) or "sum".
        return_stats: also return a `TripletStats`.

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> triplet_margin_loss(x, y, margin=0.5) >= 0
        tensor(True)
    """
    ids = (query_ids, ref_ids, relevance)
    if indices_tuple is None and not swap:
        inputs, pairs, sweep = setup_pairs(
            embeddings, labels, None, ref_emb, ref_labels, distance, ids=ids
        )
        total, counts = _swept_triplets(
            sweep, pairs.relation, distance.sign, margin, smooth_loss, return_stats
        )
    else:
        inputs = prepare_call(embeddings, labels, indices_tuple, ref_emb, ref_labels, ids)
        sweep = None
        if inputs.indices_tuple is not None:
            total, counts = _listed_triplets(inputs, distance, margin, smooth_loss, swap)
        else:
            dis = distance.as_dissimilarity(distance(inputs.embeddings, inputs.ref_emb))
            swap_dis = (
                dis if inputs.ref_is_query else distance.as_dissimilarity(distance(inputs.ref_emb))
            )
            count = return_stats or reduction == "nonzero_mean"
            total, counts = _swapped_triplets(dis, swap_dis, inputs, margin, smooth_loss, count)
    num_triplets, num_active, num_easy, num_hard = counts
    nonzero = num_triplets if smooth_loss else num_active
    scale = reduction_scale(reduction, num_triplets, nonzero).to(total.dtype)
    loss = inputs.finish(total * scale if sweep is None else sweep.result(total * scale, scale))
    if not return_stats:
        return loss
    stats = TripletStats(
        num_triplets=num_triplets,
        num_active=num_active,
        num_easy=num_easy,
        num_semihard=num_triplets - num_easy - num_hard,
        num_hard=num_hard,
        loss_sum=inputs.finish(total if sweep is None else sweep.result(total)),
        normaliser=reduction_normaliser(reduction, num_triplets, nonzero),
    )
    return loss, stats


def _triplet_terms(
    d_ap: Tensor, d_an: Tensor, margin: float, smooth: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Terms of the listed triplets and their counts (all, active, easy, hard)."""
    violation = d_ap - d_an + margin
    terms = F.softplus(violation) if smooth else F.relu(violation)
    with torch.no_grad():
        gap = d_an - d_ap
        counts = (
            torch.tensor(gap.numel()),
            (violation > 0).sum(),
            (gap >= margin).sum(),
            (gap < 0).sum(),
        )
    return terms, *counts


def _swept_triplets(sweep: Sweep, relation: Relation, sign: float, margin, smooth, with_counts):
    """All triplets without enumerating them, as an objective of the sweep: the hinge by
    counting (`hinge_block`), the soft-plus term by term (`softplus_block`), whose counts
    (only `with_counts`) come from counting too, the comparisons being the same whatever
    the function of the violation is. A similarity enters as the dissimilarity -s."""
    counted = torch.zeros(2, dtype=torch.long, device=sweep.query.device)

    def step(block: Tensor, rows: slice, work) -> tuple[Tensor, Tensor]:
        dis = block if sign > 0 else -block
        if not smooth or with_counts:
            value, active, hard, grad = hinge_block(dis, relation, rows, margin, with_counts, work)
            counted.add_(torch.stack([active, hard]))
        if smooth:
            value, grad = softplus_block(dis, relation, rows, margin, work)
        return value, (grad if sign > 0 else grad.neg_())

    def plain(matrix: Tensor, rows: slice) -> Tensor:
        dis = matrix if sign > 0 else -matrix
        return plain_triplet_sum(dis, None, relation, margin, smooth)

    total = sweep.run_closed_form(step, plain)
    num_triplets = count_triplets(relation)
    num_active, num_hard = counted
    return total, (num_triplets, num_active, num_triplets - num_active, num_hard)


def _swapped_triplets(dis, swap_dis, inputs, margin, smooth, count):
    """All triplets with the anchor swap (`AllTripletsDense`, on the whole matrices); the
    active and hard triplets are counted only with `count` (else 0)."""
    relation = _relation(inputs)
    num_triplets = count_triplets(relation)
    total, num_active, num_hard = AllTripletsDense.apply(
        dis, swap_dis, relation, margin, smooth, count
    )
    return total, (num_triplets, num_active, num_triplets - num_active, num_hard)


def _relation(inputs) -> Relation:
    """The positive and negative pairs of a loss call given labels."""
    num_ref = len(inputs.ref_emb)
    return build_relation(
        inputs.labels, inputs.ref_labels, num_ref, inputs.ids, inputs.ref_is_query, inputs.relevance
    )


def _listed_triplets(inputs, distance: BaseDistance, margin: float, smooth: bool, swap: bool):
    """The sum of the terms of the mined triplets, and their counts (`_triplet_terms`); the
    distances of the listed pairs only when they are few (`listed_distances`)."""
    triplets = inputs.indices_tuple
    if len(triplets) == 4:
        triplets = pairs_to_triplets(*triplets)
    anchor, positive, negative = drop_same_items(triplets, inputs.ids)
    pair_distance = listed_distances(distance, inputs.embeddings, inputs.ref_emb, 2 * len(anchor))
    d_ap = distance.as_dissimilarity(pair_distance(anchor, positive))
    d_an = distance.as_dissimilarity(pair_distance(anchor, negative))
    if swap:
        ref_distance = listed_distances(distance, inputs.ref_emb, inputs.ref_emb, len(anchor))
        d_an = torch.minimum(d_an, distance.as_dissimilarity(ref_distance(positive, negative)))
    terms, num_triplets, num_active, num_easy, num_hard = _triplet_terms(d_ap, d_an, margin, smooth)
    return terms.sum(), (num_triplets, num_active, num_easy, num_hard)


class ContrastiveLoss(MetricLoss):
    """Contrastive loss module; see `contrastive_loss` for the formula and arguments.

    `stats` holds the `PairStats` of the last call.

    Example:
        >>> loss_fn = ContrastiveLoss(neg_margin=1.0)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(contrastive_loss)
    local_anchor_supported = False
    local_anchor_reason = (
        "its positive and negative parts are divided by two different counts (positive pairs,"
        " negative pairs), so it is not one sum of per-anchor terms over one count"
    )


class TripletMarginLoss(MetricLoss):
    """Triplet margin loss module; see `triplet_margin_loss` for the formula and arguments.

    `stats` holds the `TripletStats` (easy / semi-hard / hard counts) of the last call.

    Example:
        >>> loss_fn = TripletMarginLoss(margin=0.2)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        >>> int(loss_fn.stats.num_triplets)
        48
    """

    function = staticmethod(triplet_margin_loss)
    local_anchor_supported = True
