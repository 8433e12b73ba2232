"""Counting and selecting triplets per anchor without enumerating them.

For an anchor a with positives p (few: K - 1 in a P x K batch) and negatives n (many), every
triplet condition used by the triplet loss and its miners compares d(a, n) with a bound that
depends on p alone (d(a, p), or d(a, p) + margin). For each (a, n) the number of the anchor's
bounds above d(a, n) gives every per-negative count, and for each bound the number of entries
of the row below it gives every per-positive count (`count_above`): O(N M K) vectorised
comparisons for small K, O(N M log K) by `searchsorted` for large K, never an N x M x K
tensor.

Same-label entries (the positives and, when the batch is its own reference set, the anchor
itself) are few per row: their contribution is computed from the (N, K) positive lists and
subtracted, and they are overwritten by a small scatter where a per-entry value must be
zero (`fill_same_label_`), so no (N, M) label mask is built. Work is done in blocks of anchor
rows (`deepmetric.blocks.RowBlocks`) whose work arrays are reused, so the temporaries stay
bounded, cache-sized and allocated once per call for any batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric.blocks import RowBlocks, backward_by_autograd
from deepmetric.pairwise import Relation

__all__ = [
    "AllTripletsDense",
    "count_above",
    "count_triplets",
    "fill_same_label_",
    "hinge_block",
    "plain_triplet_sum",
    "same_label_mask",
    "softplus_block",
    "triplet_runs",
]


def fill_same_label_(block: Tensor, columns: Tensor, has_same: Tensor, value) -> Tensor:
    """Set the same-label entries of a row block to `value`, in place, by one small scatter.

    `columns`, `has_same` are the block's rows of `Relation.same_columns` (every entry that is
    not a negative: same label, or the same item); rows without one write their column 0
    back unchanged.
    """
    keep = block[:, :1]
    source = torch.where(has_same.unsqueeze(1), torch.as_tensor(value, dtype=block.dtype), keep)
    return block.scatter_(1, columns, source.expand(columns.shape))


SEARCH_ABOVE = 24
"""Bounds per row above which one `searchsorted` beats one vectorised comparison per bound."""


def count_above(
    bounds: Tensor,
    valid: Tensor,
    block: Tensor,
    *,
    per_entry: bool = True,
    per_bound: bool = False,
    out: Tensor | None = None,
    scratch: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Compare each row's `bounds` (R, K; those where `valid`) with its entries `block` (R, M).

    Returns, in the block's dtype (exact integers):
    - per entry (R, M): how many of the row's valid bounds are > the entry;
    - per bound (R, K): how many of the row's entries are < the bound (0 where not valid).

    Up to SEARCH_ABOVE valid bounds per row this is one comparison per bound, written as
    floats (the vectorised form) and accumulated; above, one `searchsorted` on the sorted
    bounds and a per-row histogram of where the entries fall. `out` receives the per-entry
    counts and `scratch` is work space, both (R, M) in the block's dtype (e.g. from
    `RowBlocks.buffer`); they are allocated when not given.
    """
    num_rows, num_cols = block.shape
    width = int(valid.sum(dim=1).max()) if valid.numel() else 0
    if width > SEARCH_ABOVE:
        counts, below_bound = _count_above_by_search(bounds, valid, block, per_entry, per_bound)
        return (counts if out is None or counts is None else out.copy_(counts)), below_bound
    # Valid bounds first, padded with -inf (never above an entry).
    ordered, order = bounds.masked_fill(~valid, -math.inf).sort(dim=1, descending=True)
    counts = None
    if per_entry:
        counts = block.new_zeros(block.shape) if out is None else out.zero_()
    below_bound = block.new_zeros(bounds.shape) if per_bound else None
    scratch = torch.empty_like(block) if scratch is None else scratch
    for k in range(width):
        torch.lt(block, ordered[:, k : k + 1], out=scratch)
        if per_entry:
            counts.add_(scratch)
        if per_bound:
            below_bound[:, k] = scratch.sum(dim=1)
    if per_bound:
        below_bound = torch.empty_like(below_bound).scatter_(1, order, below_bound) * valid
    return counts, below_bound


def _count_above_by_search(bounds, valid, block, per_entry, per_bound):
    num_rows, num_cols = block.shape
    ordered, order = bounds.masked_fill(~valid, math.inf).sort(dim=1)
    placed = torch.searchsorted(ordered, block, right=True, out_int32=True)  # bounds <= entry
    below_bound = None
    if per_bound:
        num_buckets = bounds.shape[1] + 1
        offsets = _row_offsets(num_rows, num_buckets, block.device)
        histogram = torch.bincount((placed + offsets).view(-1), minlength=num_rows * num_buckets)
        # An entry is below the j-th smallest bound when at most j bounds are <= it.
        below_sorted = histogram.view(num_rows, num_buckets)[:, :-1].cumsum(dim=1)
        below_bound = torch.empty_like(below_sorted).scatter_(1, order, below_sorted)
        below_bound = below_bound.to(block.dtype) * valid
    counts = None
    if per_entry:
        counts = torch.sub(valid.sum(dim=1, keepdim=True), placed).to(block.dtype)
    return counts, below_bound


def count_triplets(relation: Relation) -> Tensor:
    """Number of triplets (a, p, n): sum over anchors of positives times negatives."""
    return (relation.positive_count * relation.num_negatives).sum()


def _row_offsets(num_rows: int, num_buckets: int, device) -> Tensor:
    return (torch.arange(num_rows, dtype=torch.int32, device=device) * num_buckets).unsqueeze(1)


def same_label_mask(relation: Relation) -> Tensor:
    """The dense (N, M) mask of the entries that are not negatives (for the plain forms only)."""
    return relation.non_negative_mask(slice(0, relation.num_query))


def plain_triplet_sum(dis, swap_dis, relation, margin, smooth) -> Tensor:
    """The sum of `hinge_block`, `softplus_block` or `AllTripletsDense` over the whole matrix
    by plain differentiable steps, one (N, M) term per positive slot: what is differentiated
    when a graph of the gradient is asked for (second derivatives), where speed matters less
    than being differentiable."""
    excluded = same_label_mask(relation)
    positives = relation.positives
    total = dis.new_zeros(())
    for slot in range(positives.index.shape[1]):
        column = positives.index[:, slot : slot + 1]
        negative = dis if swap_dis is None else torch.minimum(dis, swap_dis[column.squeeze(1)])
        violation = dis.gather(1, column) + margin - negative
        terms = F.softplus(violation) if smooth else F.relu(violation)
        unused = excluded | ~positives.valid[:, slot : slot + 1]
        total = total + terms.masked_fill(unused, 0).sum()
    return total


def _same_label_values(block: Tensor, relation: Relation, rows: slice):
    """The row block's entries that are not negatives (same label or same item) as (R, S)
    values sorted ascending, +inf in the unused slots."""
    lists = relation.non_negative_rows(rows)
    values = block.gather(1, lists.index).masked_fill_(~lists.valid, math.inf)
    return values.sort(dim=1).values


def _same_below(bounds: Tensor, valid: Tensor, same_sorted: Tensor) -> Tensor:
    """(R, K) in the values' dtype: how many non-negative values are < each valid bound, by a
    binary search in each row's sorted values (O(R K log S), no (R, S, K) comparison)."""
    below = torch.searchsorted(same_sorted, bounds.contiguous())
    return below.to(same_sorted.dtype) * valid


def _hinge_by_sorting(block, index, valid, same, margin, count_hard, counts_out):
    """`hinge_block` for rows with many positives, in O(R M log M).

    Each row's negatives are sorted once (other entries become +inf, at the end), with
    prefix sums: for each positive's threshold t = D[a, p] + margin, c_p = #{n : D[a, n] < t}
    is one binary search and the sum of those D[a, n] one read of the prefix sums, so the
    block's sum is sum_p c_p t_p - prefix[c_p]. k_n (how many thresholds lie above D[a, n])
    is, in sorted order, the number of c_p beyond n's rank: a histogram of the c_p summed
    from the right, put back in place by the sort's permutation. Writes k_n at the
    negatives and -c_p at the positives into `counts_out`; returns (sum, number of active
    triplets, number of hard ones, D[a, n] < D[a, p], if `count_hard`)."""
    negatives = fill_same_label_(block.clone(), *same, math.inf)
    ordered, order = negatives.sort(dim=1)
    finite = ordered.masked_fill(torch.isinf(ordered), 0)
    prefix = F.pad(finite.cumsum(dim=1, dtype=torch.float64), (1, 0))
    d_ap = block.gather(1, index)
    thresholds = (d_ap + margin).masked_fill_(~valid, -math.inf)
    active = torch.searchsorted(ordered, thresholds)  # (R, K), 0 where not valid
    total = (active * thresholds.masked_fill(~valid, 0)).sum() - prefix.gather(1, active).sum()
    rank_counts = torch.zeros(prefix.shape, dtype=torch.int32, device=block.device)
    rank_counts.scatter_add_(1, active, valid.to(torch.int32))
    beyond = rank_counts.flip(1).cumsum(dim=1, dtype=torch.int32).flip(1)[:, 1:]
    counts_out.scatter_(1, order, beyond.to(counts_out.dtype))  # #{p : c_p > rank of n}
    counts_out.scatter_add_(1, index, -(active * valid).to(counts_out.dtype))
    num_hard = torch.zeros((), dtype=torch.long, device=block.device)
    if count_hard:
        num_hard = torch.searchsorted(ordered, d_ap.masked_fill(~valid, -math.inf)).sum()
    return total.to(block.dtype), active.sum(), num_hard


def hinge_block(block, relation, rows, margin, count_hard, work):
    """One row block of the all-triplets hinge sum(a, p, n) [D[a, p] - D[a, n] + margin]+,
    exactly, in O(R M K) (O(R M log M) by sorting when the rows have many positives).

    For each positive p of anchor a, c_p = #{n : D[a, n] < D[a, p] + margin} (its active
    negatives); for each negative n, k_n = #{p : D[a, p] + margin > D[a, n]} (its active
    positives). Then the sum is sum_p c_p (D[a, p] + margin) - sum_n k_n D[a, n], and its
    gradient with respect to D is c_p at (a, p) and -k_n at (a, n), both from the same counts.

    `count_above` of the thresholds D[a, p] + margin gives k_n for every entry and, per
    threshold, the entries below it; the few same-label entries are zeroed in k (one small
    scatter) and their share of the per-threshold counts is subtracted, so every count is an
    exact integer and sum_n k_n D[a, n] is one dot product. `count_hard` adds one
    `count_above` of the D[a, p] themselves. `work` is the `RowBlocks` whose buffers are
    reused. Returns (sum, number of active triplets, number of hard triplets with D[a, n] <
    D[a, p], or 0 unless `count_hard`, the gradient of the sum in D (R, M), a work buffer).
    """
    zero = torch.zeros((), dtype=torch.long, device=block.device)
    grad = work.buffer("grad", block)
    if not bool((relation.num_negatives[rows] > 0).any()):
        return block.new_zeros(()), zero, zero, grad.zero_()  # no negative: no triplet
    (index, valid, _), (columns, has_same) = relation.block_lists(rows)
    d_ap = block.gather(1, index)
    thresholds = d_ap + margin
    if index.shape[1] > SEARCH_ABOVE:  # many positives: sort each row's negatives
        total, active, hard = _hinge_by_sorting(
            block, index, valid, (columns, has_same), margin, count_hard, grad
        )
        return total, active, hard, grad.neg_()
    scratch = {"scratch": work.buffer("scratch", block)}
    above, below = count_above(thresholds, valid, block, per_bound=True, out=grad, **scratch)
    fill_same_label_(above, columns, has_same, 0)
    same = _same_label_values(block, relation, rows)
    active = below - _same_below(thresholds, valid, same)
    total = (active * thresholds).sum() - torch.dot(above.view(-1), block.reshape(-1))
    num_hard = zero
    if count_hard:
        _, below = count_above(d_ap, valid, block, per_entry=False, per_bound=True, **scratch)
        num_hard = (below - _same_below(d_ap, valid, same)).long().sum()
    # -k_n at the negatives, c_p at the positives.
    return total, active.long().sum(), num_hard, above.neg_().scatter_add_(1, index, active)


def softplus_block(block, relation, rows, margin, work):
    """One row block of sum(a, p, n) log(1 + exp(D[a, p] + margin - D[a, n])), term by term,
    with its gradient in D (R, M).

    Each (p, n) of an anchor has its own term, so this is O(R M K) by nature: one chain of
    (R, M) passes per positive slot, value and slope (the sigmoid) together. Same-label
    entries and rows whose slot is not a positive give -inf in the differences (zero term
    and slope). Returns (sum, gradient); `work` is the `RowBlocks` whose buffers are reused.
    """
    grad = work.buffer("grad", block).zero_()
    total = block.new_zeros(())
    if not bool((relation.num_negatives[rows] > 0).any()):
        return total, grad  # no negative in the block: no triplet
    for column, _, values in _slots(block, relation, rows, margin, work):
        slopes = torch.sigmoid(values, out=work.buffer("slopes", block))
        total += torch.ops.aten.softplus.out(values, 1, 20, out=values).sum()
        grad.scatter_add_(1, column, slopes.sum(dim=1, keepdim=True))
        grad.sub_(slopes)
    return total, grad


def _slots(block, relation, rows, margin, work, swap_rows_of=None):
    """For each positive slot filled by some rows of the block, yield (the slot's (R, 1)
    columns, its D[a, p] (-inf where the row has no such positive), D[a, p] + margin -
    D'[a, n]), in work arrays reused from slot to slot. D' is the block with -inf at the
    same-label entries, or with `swap_rows_of(columns, out)` (the anchor swap)
    min(D[a, n], S[p, n]) with +inf there (see `AllTripletsDense`)."""
    positives, same = relation.block_lists(rows)
    # Each row's positives first, so that the slots to visit are the first `width`.
    valid = positives.valid
    first = valid.logical_not().to(torch.uint8).argsort(dim=1, stable=True)
    index, valid = positives.index.gather(1, first), valid.gather(1, first)
    d_ap = block.gather(1, index).masked_fill_(~valid, -math.inf)
    values = work.buffer("values", block)
    for slot in range(int(valid.sum(dim=1).max()) if valid.numel() else 0):
        column, threshold = index[:, slot : slot + 1], d_ap[:, slot : slot + 1] + margin
        if swap_rows_of is None:
            fill_same_label_(torch.sub(threshold, block, out=values), *same, -math.inf)
        else:
            negative = swap_rows_of(column, work)
            fill_same_label_(negative, *same, math.inf)
            torch.sub(threshold, negative, out=values)
        yield column, d_ap[:, slot : slot + 1], values


class AllTripletsDense(torch.autograd.Function):
    """sum over all triplets (a, p, n) of f(D[a, p] + margin - min(D[a, n], S[p, n])): the
    anchor swap (Balntas et al. 2016), term by term.

    f is the hinge [.]+ or the soft-plus log(1 + exp(.)); S is the distance matrix of the
    reference set (S is D when the batch is its own reference set). The rows S[p] of every
    positive p of a block's anchors are read from the whole S, which is why this stays an
    autograd Function on the two matrices rather than a `deepmetric.blocks.Sweep` step (a
    sweep sees one block of D at a time). Per row block and per positive slot, one chain of
    (R, M) passes in forward and one for the derivative in backward (recomputed rather than
    stored, so memory stays O(N M) for any K). Same-label entries and rows whose slot is not
    a positive get D' = +inf (their terms and slopes are 0). The minimum's gradient goes to
    the smaller side, half to each on ties, as for `torch.minimum`.

    forward(dis, swap_dis, relation, margin, smooth, count) returns (sum, number of triplets
    with a positive hinge, number with D'[a, p, n] < D[a, p]), the two counts computed only
    with `count` (else 0); only the sum is differentiable. Under create_graph its backward
    differentiates `plain_triplet_sum` (the one double-backward policy, `deepmetric.blocks`).
    """

    @staticmethod
    def forward(ctx, dis, swap_dis, relation, margin, smooth, count):  # noqa: D102
        total = dis.new_zeros(())
        num_active = torch.zeros((), dtype=torch.long, device=dis.device)
        num_hard = torch.zeros((), dtype=torch.long, device=dis.device)
        for _, _, d_ap, negative, values, _ in _swap_slots(dis, swap_dis, relation, margin):
            if count:
                num_hard += torch.count_nonzero(negative < d_ap)
                num_active += torch.count_nonzero(values > 0)
            if smooth:
                total += torch.ops.aten.softplus.out(values, 1, 20, out=values).sum()
            else:
                total += values.clamp_min_(0).sum()
        ctx.save_for_backward(dis, swap_dis)
        ctx.constants = (relation, margin, smooth, swap_dis is dis)
        ctx.mark_non_differentiable(num_active, num_hard)
        return total, num_active, num_hard

    @staticmethod
    def backward(ctx, grad_total, *_):  # noqa: D102
        dis, swap_dis = ctx.saved_tensors
        relation, margin, smooth, same_set = ctx.constants
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            grads = backward_by_autograd(
                lambda: plain_triplet_sum(dis, swap_dis, relation, margin, smooth),
                (dis, None if same_set else swap_dis),
                grad_total,
            )
            return *grads, None, None, None, None
        grad = torch.zeros_like(dis, memory_format=torch.contiguous_format)
        grad_swap = grad if same_set else torch.zeros_like(swap_dis)
        for rows, index, _, negative, slopes, swap_rows in _swap_slots(
            dis, swap_dis, relation, margin
        ):
            if smooth:
                torch.sigmoid(slopes, out=slopes)
            else:
                torch.gt(slopes, 0, out=slopes)
            grad[rows].scatter_add_(1, index, slopes.sum(dim=1, keepdim=True))
            # d min(a, b) / da = [a < b] + [a = b] / 2; the rest of the slope goes to b.
            block, to_anchor = dis[rows], negative
            torch.eq(block, swap_rows, out=to_anchor).mul_(0.5)
            to_anchor.add_(torch.lt(block, swap_rows, out=swap_rows)).mul_(slopes)
            grad[rows].sub_(to_anchor)
            grad_swap.index_add_(0, index.squeeze(1), slopes.sub_(to_anchor), alpha=-1)
        grad.mul_(grad_total)
        if grad_swap is grad:
            return grad, None, None, None, None, None
        return grad, grad_swap.mul_(grad_total), None, None, None, None


def _swap_slots(dis, swap_dis, relation, margin):
    """`_slots` of each row block of D with the anchor swap: yields (rows, columns, D[a, p],
    D'[a, n] = min(D[a, n], S[p, n]) (+inf at same-label entries), D[a, p] + margin -
    D'[a, n], S[p] rows)."""
    blocks = RowBlocks(*dis.shape, passes=True)
    for rows in blocks:
        if not bool((relation.num_negatives[rows] > 0).any()):
            continue  # no negative in the block: no triplet
        block = dis[rows]

        def swap_rows_of(column, work, block=block):
            swap_rows = work.buffer("swap_rows", block)
            torch.index_select(swap_dis, 0, column.squeeze(1), out=swap_rows)
            return torch.minimum(block, swap_rows, out=work.buffer("negative", block))

        for column, d_ap, values in _slots(block, relation, rows, margin, blocks, swap_rows_of):
            negative = blocks.buffer("negative", block)
            yield rows, column, d_ap, negative, values, blocks.buffer("swap_rows", block)


def triplet_runs(
    dis: Tensor,
    relation: Relation,
    lower_offset: float | None,
    upper_offset: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """All triplets (a, p, n) with lower_offset <= D[a, n] - D[a, p] < upper_offset.

    An offset of None leaves that side open. Per (a, n) the positives that qualify are one
    run of the positives sorted by D[a, p]: they have D[a, n] < D[a, p] + upper_offset (a
    suffix, counted by `count_above`) but not D[a, n] < D[a, p] + lower_offset (a shorter
    suffix). No N x N x K tensor is built: the cost is O(N M K) comparisons plus the number of
    triplets returned.
    """
    empty = torch.zeros(0, dtype=torch.long, device=dis.device)
    anchors, pos_out, negs = [empty], [empty], [empty]
    num_cols = dis.shape[1]
    blocks = RowBlocks(*dis.shape, passes=True)
    for rows in blocks:
        if not bool((relation.num_negatives[rows] > 0).any()):
            continue  # no negative in the block: no triplet
        block = dis[rows]
        (index, valid, count), (columns, has_same) = relation.block_lists(rows)
        d_ap = block.gather(1, index)
        sorted_index = index.gather(1, d_ap.masked_fill(~valid, math.inf).argsort(dim=1))
        count = count.unsqueeze(1).to(dis.dtype)
        lengths, scratch = blocks.buffer("lengths", dis), blocks.buffer("scratch", dis)
        if upper_offset is None:
            lengths.copy_(count.expand(block.shape))
        else:
            count_above(d_ap + upper_offset, valid, block, out=lengths, scratch=scratch)
        if lower_offset is not None:
            not_lower = blocks.buffer("not_lower", dis)
            count_above(d_ap + lower_offset, valid, block, out=not_lower, scratch=scratch)
            lengths.sub_(not_lower)
        fill_same_label_(lengths, columns, has_same, 0)
        (where,) = lengths.view(-1).nonzero(as_tuple=True)
        run_length = lengths.view(-1)[where].long()
        owner = torch.repeat_interleave(torch.arange(len(where), device=dis.device), run_length)
        # The run ends where the suffix of positives with D[a, n] < D[a, p] + lower begins.
        run_end = count.expand(block.shape).reshape(-1)[where].long()
        if lower_offset is not None:
            run_end = run_end - not_lower.view(-1)[where].long()
        slot = (
            torch.arange(len(owner), device=dis.device)
            - torch.cumsum(run_length, 0)[owner]
            + run_end[owner]
        )
        anchor_row = torch.div(where, num_cols, rounding_mode="floor")[owner]
        anchors.append(anchor_row + rows.start)
        pos_out.append(sorted_index[anchor_row, slot])
        negs.append((where % num_cols)[owner])
    return tuple(torch.cat(parts) for parts in (anchors, pos_out, negs))
