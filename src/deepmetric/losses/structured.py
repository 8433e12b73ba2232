"""Structured batch losses over all pairs of a batch (SPEC §4).

Lifted structured loss, multi-similarity loss and circle loss. The ranked list and margin
losses are in `boundary`, the temperature-softmax family (N-pair, NT-Xent / InfoNCE, SupCon) in
`softmax_pairs`, the histogram loss in `histogram`, the cluster-level losses in `clustering`.

Every loss works on the (N, M) matrix between the batch and the reference set (the batch
itself unless `ref_emb` is given), one block of anchor rows at a time (`_blocks`): memory is
O(N M) at most, never (positive pairs x negative pairs). The lifted loss, written for a
distance, takes a similarity s as the dissimilarity -s; the losses written for a similarity
(multi-similarity, circle) take a distance d as the similarity -d, so any
`BaseDistance` works; margins are in the units of the chosen distance or similarity.

`indices_tuple` (mined pairs (a1, p, a2, n) or triplets (a, p, n)) restricts the positive and
negative pairs to the mined ones; each mined pair counts once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric._validation import check_finite, check_flag, check_non_negative, check_positive
from deepmetric.distances import BaseDistance, CosineSimilarity, EuclideanDistance
from deepmetric.losses._blocks import (
    StructuredStats,
    count_terms,
    finish_sum,
    masked_logsumexp,
    new_counts,
    setup_pairs,
)
from deepmetric.losses.base import MetricLoss, any_distance, checked

# ---------------------------------------------------------------------------------------------
# Lifted structured loss

LIST_CHUNK_ELEMENTS = 1 << 18
"""Entries (rows x M) per chunk of rows whose positive lists the lifted loss reads at once."""


@checked(
    any_distance(EuclideanDistance),
    neg_margin=check_non_negative,
    pos_margin=check_finite,
    smooth=check_flag,
)
def lifted_structure_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    smooth: bool = True,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, StructuredStats]:
    """Lifted structured loss (Song, Xiang, Jegelka & Savarese 2016; survey eq. 3; seed 001).

    For each positive pair (i, j), with the negatives k of i and l of j:

        smooth=True  (the paper):  J_ij = log(sum_k exp(a - D_ik) + sum_l exp(a - D_jl)) + D_ij - b
        smooth=False (survey eq. 3): J_ij = max(max_k (a - D_ik), max_l (a - D_jl)) + D_ij - b

        L = 1 / (2 |P|) sum_{(i, j) in P} [J_ij]+^2

    with a = `neg_margin`, b = `pos_margin` (0 in the paper). Pairs are ordered, each
    unordered pair counted twice, which leaves the average unchanged. With `ref_emb`, i is a
    batch row and j a reference item; "the negatives of j" are the batch items of another
    class (column j of the matrix), which is row j when the reference set is the batch.
    Cost: two sweeps over the matrix (statistics, then gradients), O(N M) time, bounded memory.

    Args:
        neg_margin: a, negatives closer than a are penalised (distance units).
        pos_margin: b, subtracted from the positive distance (distance units).
        smooth: the paper's log-sum-exp (True) or the survey's hardest negative (False).
        distance: any `BaseDistance` (default Euclidean); a similarity s enters as D = -s.
        reduction: "mean" (over positive pairs, the 1/|P| of the formula), "nonzero_mean" or
            "sum"; the factor 1/2 is always applied.
        return_stats: also return a `StructuredStats` (terms: positive pairs).

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> lifted_structure_loss(x, y, neg_margin=1.0) >= 0
        tensor(True)
    """
    ids = (query_ids, ref_ids, relevance)
    inputs, pairs, sweep = setup_pairs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, distance, ids=ids
    )
    columns = not inputs.ref_is_query
    stats = _negative_statistics(sweep, pairs, distance, neg_margin, smooth, columns)
    plain = partial(_plain_lifted, pairs, distance, neg_margin, pos_margin, smooth, columns)
    if _symmetric(inputs):
        total, counts = _lifted_one_pass(stats, sweep, pairs, distance, neg_margin, pos_margin)
    else:
        total, counts, grad_row, grad_col = _lifted_sums(stats, sweep, pairs, distance, pos_margin)
        if sweep.tracking:
            grads = (grad_row, grad_col)
            gradient = _lifted_block_gradient(stats, grads, pairs, distance, neg_margin, pos_margin)
            sweep.run_gradient(gradient, plain)
    count = counts[1 if reduction == "nonzero_mean" else 0].clamp_min(1).to(total.dtype)
    scale = 0.5 / (torch.ones_like(count) if reduction == "sum" else count)
    loss = inputs.finish(sweep.result(total * scale, scale))
    if not return_stats:
        return loss
    return loss, StructuredStats(num_terms=counts[0], num_active=counts[1])


def _symmetric(inputs) -> bool:
    """Whether the pairs of the call are symmetric: the batch is its own reference set and
    (i, j) is a positive pair exactly when (j, i) is (class ids or label sets, no relevance
    matrix or mined tuples). Then J_ij = J_ji (logaddexp and max are symmetric, D too)."""
    return inputs.ref_is_query and inputs.indices_tuple is None and inputs.relevance is None


def _lifted_one_pass(stats, sweep, pairs, distance, neg_margin, pos_margin):
    """Sweep 2 of the lifted loss when the pairs are symmetric: the sum of the terms, (number
    of terms, number of non-zero terms), and its gradient in D, in one pass. Each unordered
    pair's term appears twice, as (i, j) and (j, i), so the derivative of the sum in row i's
    statistic is twice that of row i's own terms: every row's share is known from its own
    positive lists, without a pass over the other rows first."""
    counts = torch.zeros(2, dtype=torch.long, device=sweep.query.device)
    row_safe = stats.row_stat.masked_fill(torch.isinf(stats.row_stat), 0).unsqueeze(1)

    def step(block: Tensor, rows: slice, work) -> tuple[Tensor, Tensor | None]:
        total = block.new_zeros(())
        grad_row = block.new_zeros(rows.stop - rows.start)
        pos_grads = []
        for chunk, part in _list_chunks(pairs, rows, block):
            positives = pairs.positive_rows(chunk)
            pos_dis = distance.as_dissimilarity(part.gather(1, positives.index))
            own = stats.row_stat[chunk]
            with torch.enable_grad():
                pos_dis.requires_grad_(sweep.tracking)
                own = own.clone().requires_grad_(sweep.tracking)
                terms = stats.terms(positives, pos_dis, pos_margin, own, stats.row_stat)
                if sweep.tracking:
                    grad_own, grad_pos = torch.autograd.grad(terms.sum(), (own, pos_dis))
                    offset = chunk.start - rows.start
                    grad_row[offset : offset + len(part)] = 2 * grad_own
                    pos_grads.append((offset, positives.index, grad_pos))
            total += terms.detach().sum()
            counts.add_(torch.stack([positives.valid.sum(), ((terms > 0) & positives.valid).sum()]))
        if not sweep.tracking:
            return total, None
        values = _margin_values(block, distance, neg_margin, pairs.negative_mask(rows))
        if stats.smooth:
            grad = (values - row_safe[rows]).exp_().mul_(-grad_row.unsqueeze(1))
        else:
            grad = torch.zeros_like(values)
            grad.scatter_(1, stats.row_arg[rows].unsqueeze(1), -grad_row.unsqueeze(1))
        for offset, index, grad_pos in pos_grads:
            grad[offset : offset + len(index)].scatter_add_(1, index, grad_pos)
        return total, distance.as_dissimilarity(grad)  # d(-s)/ds = -1 for a similarity

    plain = partial(_plain_lifted, pairs, distance, neg_margin, pos_margin, stats.smooth, False)
    return sweep.run_closed_form(step, plain), counts


@dataclass
class _NegativeStatistics:
    """Per row (and, with a separate reference set, per column) the log-sum-exp (smooth) or
    the maximum (hard) of neg_margin - D over the negatives, with the argmax: O(N + M)."""

    row_stat: Tensor
    row_arg: Tensor
    col_stat: Tensor
    col_arg: Tensor
    smooth: bool
    columns: bool

    def terms(self, positives, pos_dis: Tensor, pos_margin: float, own, side) -> Tensor:
        """`_lifted_terms` with these statistics' kind (smooth or hard)."""
        return _lifted_terms(self.smooth, positives, pos_dis, pos_margin, own, side)


def _lifted_terms(smooth: bool, positives, pos_dis: Tensor, pos_margin: float, own, side):
    """[J_ij]+^2 (R, K) of the listed positive pairs of a block of rows, from their distances
    `pos_dis` and the statistics `own` (R,) of the rows and `side` (the row or column
    statistics, indexed by the positives' columns)."""
    side = side[positives.index]
    own = own.unsqueeze(1).expand_as(side)
    empty = torch.isinf(own) & torch.isinf(side)
    own, side = own.masked_fill(empty, 0), side.masked_fill(empty, 0)
    hardest = torch.logaddexp(own, side) if smooth else torch.maximum(own, side)
    terms = F.relu(hardest + pos_dis - pos_margin).pow(2)
    return terms.masked_fill(empty | ~positives.valid, 0)


def _negative_statistics(sweep, pairs, distance, neg_margin, smooth, columns):
    """Sweep 1 of the lifted loss: `_NegativeStatistics` of every row and column."""
    num_rows, num_cols = sweep.num_rows, sweep.num_cols
    like = sweep.query
    row_stat = like.new_empty(num_rows)
    row_arg = torch.zeros(num_rows, dtype=torch.long, device=like.device)
    col_stat = like.new_full((num_cols,), -torch.inf)
    col_arg = torch.zeros(num_cols, dtype=torch.long, device=like.device)
    for rows, block in sweep.blocks():
        values = _margin_values(block, distance, neg_margin, pairs.negative_mask(rows))
        if smooth:
            row_stat[rows] = masked_logsumexp(values, None)
        else:
            row_stat[rows], row_arg[rows] = values.max(dim=1)
        if columns and smooth:
            col_stat = torch.logaddexp(col_stat, masked_logsumexp(values, None, dim=0))
        elif columns:
            top, arg = values.max(dim=0)
            better = top > col_stat
            col_arg = torch.where(better, arg + rows.start, col_arg)
            col_stat = torch.where(better, top, col_stat)
    return _NegativeStatistics(
        row_stat.detach(), row_arg, col_stat.detach(), col_arg, smooth, columns
    )


def _lifted_sums(stats, sweep, pairs, distance, pos_margin):
    """Sweep 2 of the lifted loss, one block of rows at a time (positive lists of the block
    only, never an (N, K) table): the sum of the terms, (number of terms, number of non-zero
    terms), and the gradients of the sum with respect to the row and column statistics."""
    row_leaf = stats.row_stat.clone().requires_grad_(sweep.tracking)
    col_leaf = stats.col_stat.clone().requires_grad_(sweep.tracking) if stats.columns else row_leaf
    leaves = [row_leaf, col_leaf] if stats.columns else [row_leaf]
    total = sweep.query.new_zeros(())
    counts = torch.zeros(2, dtype=torch.long, device=total.device)
    grads = [torch.zeros_like(leaf) for leaf in leaves]
    for block_rows, block in sweep.blocks():
        for rows, part in _list_chunks(pairs, block_rows, block):
            positives = pairs.positive_rows(rows)
            pos_dis = distance.as_dissimilarity(part.gather(1, positives.index))
            with torch.enable_grad():
                terms = stats.terms(positives, pos_dis, pos_margin, row_leaf[rows], col_leaf)
                chunk_total = terms.sum()
                if sweep.tracking:
                    for acc, grad in zip(
                        grads, torch.autograd.grad(chunk_total, leaves), strict=True
                    ):
                        acc += grad
            total += chunk_total.detach()
            counts += torch.stack([positives.valid.sum(), ((terms > 0) & positives.valid).sum()])
    return total, counts, grads[0], grads[-1]


def _list_chunks(pairs, rows: slice, block: Tensor):
    """(rows, block rows) in chunks of rows whose (R, K) positive lists stay a few MiB: the
    lists and their terms' graph are made per chunk, not per sweep block. K is the chunk's
    largest positive count (the class size), M for multi-hot labels, relevance, mined pairs."""
    if pairs.relation is not None and pairs.relation.from_class_ids:
        width = int(pairs.relation.positive_count[rows].max()) + 1
    else:
        width = block.shape[1]
    step = max(1, LIST_CHUNK_ELEMENTS // width)
    for start in range(0, rows.stop - rows.start, step):
        stop = min(start + step, rows.stop - rows.start)
        yield slice(rows.start + start, rows.start + stop), block[start:stop]


def _lifted_block_gradient(stats, grads, pairs, distance, neg_margin, pos_margin):
    """Sweep 3: dL/dD[rows] (in the distance's own orientation) through the positive
    distances (recomputed for the block) and the negative statistics: d stat / d D =
    -softmax of the values (smooth) or -1 at the argmax (hard)."""
    grad_row, grad_col = grads
    grad_col = grad_col if stats.columns else None
    row_safe = stats.row_stat.masked_fill(torch.isinf(stats.row_stat), 0).unsqueeze(1)
    col_safe = stats.col_stat.masked_fill(torch.isinf(stats.col_stat), 0).unsqueeze(0)
    row_arg, col_arg = stats.row_arg, stats.col_arg
    side = stats.col_stat if stats.columns else stats.row_stat

    def block_gradient(block: Tensor, rows: slice) -> Tensor:
        values = _margin_values(block, distance, neg_margin, pairs.negative_mask(rows))
        if stats.smooth:
            grad = (values - row_safe[rows]).exp_().mul_(-grad_row[rows].unsqueeze(1))
            if grad_col is not None:
                grad.sub_(values.sub_(col_safe).exp_().mul_(grad_col))
        else:
            grad = torch.zeros_like(values)
            grad.scatter_(1, row_arg[rows].unsqueeze(1), -grad_row[rows].unsqueeze(1))
            if grad_col is not None:
                inside = (col_arg >= rows.start) & (col_arg < rows.stop)
                cols = inside.nonzero().squeeze(1)
                grad.index_put_(
                    (col_arg[cols] - rows.start, cols), -grad_col[cols], accumulate=True
                )
        for chunk, part in _list_chunks(pairs, rows, block):
            positives = pairs.positive_rows(chunk)
            with torch.enable_grad():
                pos_dis = distance.as_dissimilarity(part.gather(1, positives.index))
                pos_dis.requires_grad_()
                own = stats.row_stat[chunk]
                terms = stats.terms(positives, pos_dis, pos_margin, own, side)
                (grad_pos,) = torch.autograd.grad(terms.sum(), pos_dis)
            offset = chunk.start - rows.start
            grad[offset : offset + len(part)].scatter_add_(1, positives.index, grad_pos)
        return distance.as_dissimilarity(grad)  # d(-s)/ds = -1 for a similarity

    return block_gradient


def _plain_lifted(pairs, distance, neg_margin, pos_margin, smooth, columns, matrix, rows):
    """The lifted loss's sum of terms by plain differentiable steps on the whole matrix (the
    sweep's replay, for second derivatives)."""
    values = _margin_values(matrix, distance, neg_margin, pairs.negative_mask(rows))
    if smooth:
        row_stat = masked_logsumexp(values, None)
        col_stat = masked_logsumexp(values, None, dim=0) if columns else row_stat
    else:
        row_stat = values.amax(dim=1)
        col_stat = values.amax(dim=0) if columns else row_stat
    positives = pairs.positive_rows(rows)
    pos_dis = distance.as_dissimilarity(matrix.gather(1, positives.index))
    return _lifted_terms(smooth, positives, pos_dis, pos_margin, row_stat, col_stat).sum()


def _margin_values(
    block: Tensor, distance: BaseDistance, neg_margin: float, negatives: Tensor
) -> Tensor:
    """neg_margin - D on the negative pairs, -inf elsewhere (a fresh tensor)."""
    values = torch.sub(neg_margin, distance.as_dissimilarity(block))
    return values.masked_fill_(~negatives, -torch.inf)


class LiftedStructureLoss(MetricLoss):
    """Lifted structured loss module; see `lifted_structure_loss` for the formula and arguments.

    Example:
        >>> loss_fn = LiftedStructureLoss(neg_margin=1.0)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(lifted_structure_loss)
    local_anchor_supported = False
    local_anchor_reason = (
        "lifted structure's pair term needs the negatives of both members of a positive pair,"
        " and the reference member's negatives are another rank's anchors"
    )


# ---------------------------------------------------------------------------------------------
# Multi-similarity loss


@checked(
    any_distance(CosineSimilarity), alpha=check_positive, beta=check_positive, base=check_finite
)
def multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, StructuredStats]:
    """Multi-similarity loss (Wang, Han, Huang, Dong & Scott 2019).

        L_i = 1/alpha log(1 + sum_{p in P_i} exp(-alpha (s_ip - base)))
            + 1/beta  log(1 + sum_{n in N_i} exp( beta (s_in - base)))

    per anchor i, averaged over the anchors that have at least one pair. The paper pairs it
    with its own mining step, `MultiSimilarityMiner`: pass the miner's output as
    `indices_tuple`.

    Args:
        alpha: positive scale, > 0 (1 / similarity units).
        beta: negative scale, > 0 (1 / similarity units).
        base: lambda, the similarity margin both sums are centred on (similarity units).
        distance: default cosine similarity; a distance d enters as s = -d.
        reduction: "mean" over anchors, "nonzero_mean" or "sum".
        return_stats: also return a `StructuredStats` (terms: anchors with a pair).

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> multi_similarity_loss(x, y) >= 0
        tensor(True)
    """
    ids = (query_ids, ref_ids, relevance)
    inputs, pairs, sweep = setup_pairs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, distance, ids=ids
    )
    counts = new_counts(inputs)

    def objective(block: Tensor, rows: slice) -> Tensor:
        sim = distance.as_similarity(block)
        positives = pairs.positive_rows(rows)
        negatives = pairs.negative_mask(rows)
        pos_sim = sim.gather(1, positives.index)
        pos_part = masked_logsumexp(-alpha * (pos_sim - base), positives.valid, add_one=True)
        neg_part = masked_logsumexp(beta * (sim - base), negatives, add_one=True)
        terms = pos_part / alpha + neg_part / beta
        count_terms(counts, terms, (positives.count > 0) | negatives.any(dim=1))
        return terms.sum()

    total = sweep.run(objective)
    return finish_sum(inputs, sweep, total, counts, reduction, return_stats)


class MultiSimilarityLoss(MetricLoss):
    """Multi-similarity loss module; see `multi_similarity_loss` for the formula and arguments.

    Example:
        >>> loss_fn = MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(multi_similarity_loss)
    local_anchor_supported = True


# ---------------------------------------------------------------------------------------------
# Circle loss


def check_relaxation(value: float, name: str) -> float:
    """`value` if it is a circle-loss margin in [0, 1); a ValueError naming `name` otherwise."""
    value = check_finite(value, name)
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1) (cosine units), got {value}")
    return value


@checked(any_distance(CosineSimilarity), m=check_relaxation, gamma=check_positive)
def circle_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, StructuredStats]:
    """Circle loss, pair-label form (Sun, Cheng, Zhang, Zhang, Zheng, Wang & Wei 2020, eq. 6).

        L_i = log(1 + sum_{n in N_i} exp(gamma a_n (s_n - m))
                    * sum_{p in P_i} exp(-gamma a_p (s_p - 1 + m)))

    with a_p = [1 + m - s_p]+ and a_n = [s_n + m]+ treated as constants in backpropagation
    (as in the paper), averaged over the anchors that have a positive and a negative.
    The paper's settings: m = 0.25, gamma = 256 (faces, re-id); m = 0.4, gamma = 80
    (fine-grained retrieval, the default).

    Args:
        m: relaxation margin, in [0, 1) (similarity units).
        gamma: scale, > 0.
        distance: default cosine similarity (the formula assumes s in [-1, 1]); a distance d
            enters as s = -d.
        reduction: "mean" over anchors, "nonzero_mean" or "sum".
        return_stats: also return a `StructuredStats` (terms: anchors with both pair kinds).

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> circle_loss(x, y) >= 0
        tensor(True)
    """
    ids = (query_ids, ref_ids, relevance)
    inputs, pairs, sweep = setup_pairs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, distance, ids=ids
    )
    counts = new_counts(inputs)

    def objective(block: Tensor, rows: slice) -> Tensor:
        sim = distance.as_similarity(block)
        positives = pairs.positive_rows(rows)
        negatives = pairs.negative_mask(rows)
        pos_sim = sim.gather(1, positives.index)
        pos_logits = -gamma * (1 + m - pos_sim.detach()).clamp_min(0) * (pos_sim - 1 + m)
        neg_logits = gamma * (sim.detach() + m).clamp_min(0) * (sim - m)
        both = masked_logsumexp(pos_logits, positives.valid) + masked_logsumexp(
            neg_logits, negatives
        )
        terms = F.softplus(both)
        count_terms(counts, terms, (positives.count > 0) & negatives.any(dim=1))
        return terms.sum()

    total = sweep.run(objective)
    return finish_sum(inputs, sweep, total, counts, reduction, return_stats)


class CircleLoss(MetricLoss):
    """Circle loss module; see `circle_loss` for the formula and arguments.

    Example:
        >>> loss_fn = CircleLoss(m=0.25, gamma=256)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(circle_loss)
    local_anchor_supported = True
