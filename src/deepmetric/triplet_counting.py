"""Counting and selecting triplets per anchor without enumerating them.

For an anchor a with positives p (few: K - 1 in a P x K batch) and negatives n (many), every
triplet condition used by the triplet loss and its miners compares d(a, n) with a bound that
depends on p alone (d(a, p), or d(a, p) + margin). Sorting each anchor's bounds and placing
every negative among them with one `searchsorted` gives, for each (a, n), its bucket: how
many bounds are <= d(a, n). Per-row tables indexed by the bucket then give every count (active
positives, hard positives, the run of positives a miner selects), and a per-row histogram of
the buckets gives the per-positive counts: O(N M log K) time, O(N M) bytes of buckets.

Same-label entries (the positives and, when the batch is its own reference set, the anchor
itself) are sent to a dump bucket by scattering over the (N, K) positive lists, so no (N, M)
label mask is built. Work is done in blocks of anchor rows (`row_blocks`) so the temporaries
stay bounded and are served from malloc's heap for any batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from deepmetric.distances import BLOCK_ELEMENTS, row_blocks
from deepmetric.tuples import PositiveLists

__all__ = [
    "BLOCK_ELEMENTS",
    "AllTripletsHinge",
    "count_at_most",
    "fill_same_label_",
    "negative_mask",
    "row_blocks",
    "same_label_columns",
    "sorted_positive_values",
    "triplet_runs",
]


def sorted_positive_values(values: Tensor, positives: PositiveLists) -> tuple[Tensor, Tensor]:
    """Each row's positive values sorted ascending, invalid slots as +inf at the end.

    Returns the sorted (N, K) values and the permutation from sorted slots to list slots.
    """
    padded = values.masked_fill(~positives.valid, float("inf"))
    return padded.sort(dim=1)


def count_at_most(sorted_values: Tensor, values: Tensor) -> Tensor:
    """For each entry of `values` (N, M): how many of its row's `sorted_values` (N, K) are <= it."""
    return torch.searchsorted(sorted_values.contiguous(), values.contiguous(), right=True)


def negative_mask(labels: Tensor, ref_labels: Tensor) -> Tensor:
    """(n, M) mask of pairs with different labels."""
    return labels.unsqueeze(1) != ref_labels.unsqueeze(0)


def same_label_columns(positives: PositiveLists, ref_is_query: bool) -> tuple[Tensor, Tensor]:
    """Every row's same-label columns as an (N, K) index, and which rows have any.

    The same-label columns of row i are its positives plus, when the batch is its own
    reference set, i itself. Every slot of the index names one of them: invalid slots repeat
    the anchor (ref_is_query, where the anchor's own slot is the invalid one) or the first
    positive. Rows without any same-label column (a label absent from the reference set)
    point at column 0 and have `has_same` False; see `fill_same_label_`.
    """
    index, valid, count = positives
    if ref_is_query:
        own = torch.arange(len(index), device=index.device).unsqueeze(1)
        return torch.where(valid, index, own), torch.ones_like(count, dtype=torch.bool)
    return torch.where(valid, index, index[:, :1]), count > 0


def fill_same_label_(block: Tensor, columns: Tensor, has_same: Tensor, value) -> Tensor:
    """Set the same-label entries of a row block to `value`, in place, by one small scatter.

    `columns`, `has_same` are the block's rows of `same_label_columns`; rows without a
    same-label column write their column 0 back unchanged.
    """
    keep = block[:, :1]
    source = torch.where(has_same.unsqueeze(1), torch.as_tensor(value, dtype=block.dtype), keep)
    return block.scatter_(1, columns, source.expand(columns.shape))


def _take_rows(positives: PositiveLists, rows: slice) -> PositiveLists:
    return PositiveLists(positives.index[rows], positives.valid[rows], positives.count[rows])


class _Bounds:
    """Each row's bounds (several kinds of K values) sorted together, and per-bucket tables.

    `kinds` is a list of (R, K) bound tables (d(a, p) + offset). After `place`, the bucket of
    a value d is the number of bounds <= d over all kinds; `below(kind)` gives, per bucket,
    how many bounds of that kind are <= d (an (R, B) table, B = kinds * K + 1).
    """

    def __init__(self, kinds: list[Tensor], valid: Tensor) -> None:
        self.width = kinds[0].shape[1]
        values = torch.cat(kinds, dim=1).masked_fill_(~valid.repeat(1, len(kinds)), float("inf"))
        self.sorted, self.order = values.sort(dim=1)
        self.is_valid = valid.repeat(1, len(kinds)).gather(1, self.order)
        self.num_buckets = values.shape[1] + 1

    def place(self, block: Tensor) -> Tensor:
        """int32 buckets of the entries of `block` among the row's sorted bounds."""
        return torch.searchsorted(self.sorted, block, right=True, out_int32=True)

    def below(self, kind: int) -> Tensor:
        """(R, B) table: bounds of `kind` <= a value in bucket b, for b = 0 .. B - 1."""
        of_kind = (self.order // self.width == kind) & self.is_valid
        counts = of_kind.to(torch.int64).cumsum(dim=1)
        return F.pad(counts, (1, 0))

    def rank_of(self, kind: int) -> Tensor:
        """(R, K) sorted slot of each bound of `kind`, in list order."""
        inverse = torch.empty_like(self.order)
        slots = torch.arange(self.order.shape[1], device=self.order.device)
        inverse.scatter_(1, self.order, slots.expand_as(self.order))
        return inverse[:, kind * self.width : (kind + 1) * self.width]


def _row_offsets(num_rows: int, num_buckets: int, device) -> Tensor:
    return (torch.arange(num_rows, dtype=torch.int32, device=device) * num_buckets).unsqueeze(1)


class AllTripletsHinge(torch.autograd.Function):
    """sum over all triplets (a, p, n) of [D[a, p] - D[a, n] + margin]+, exactly, in O(N M log K).

    For each positive p of anchor a, c_p = #{n : D[a, n] < D[a, p] + margin} (its active
    negatives); for each negative n, k_n = #{p : D[a, p] + margin > D[a, n]} (its active
    positives). Then the sum is sum_p c_p (D[a, p] + margin) - sum_n k_n D[a, n], and the
    gradient with respect to D is c_p at (a, p) and -k_n at (a, n), both from the same counts.

    With one `searchsorted` per entry placing D[a, n] among the sorted thresholds (and, when
    `count_hard`, among the D[a, p] too), k_n is a per-row table indexed by the bucket, c_p a
    cumulative histogram of the buckets, and sum_n k_n D[a, n] the table dotted with the
    per-bucket sums of D[a, n] (a weighted histogram): three passes over each (N, M) block.
    Only the uint8 buckets are kept for backward, which is one table lookup per entry.

    forward(dis, positives, ref_is_query, margin, count_hard) returns (sum, number of
    triplets, number of active triplets, number of hard triplets with D[a, n] < D[a, p], or 0
    unless `count_hard`); only the sum is differentiable.
    """

    @staticmethod
    def forward(ctx, dis, positives, ref_is_query, margin, count_hard):  # noqa: D102
        num_rows, num_cols = dis.shape
        columns, has_same = same_label_columns(positives, ref_is_query)
        num_buckets = (2 if count_hard else 1) * positives.index.shape[1] + 2
        dump = num_buckets - 1
        buckets = dis.new_empty(dis.shape, dtype=torch.uint8 if dump <= 255 else torch.int32)
        active_per_positive = torch.zeros_like(positives.index)
        backward_table = dis.new_zeros((num_rows, num_buckets))
        total = dis.new_zeros(())
        num_hard = torch.zeros((), dtype=torch.long, device=dis.device)
        for rows in row_blocks(num_rows, num_cols):
            block = dis[rows]
            pos = _take_rows(positives, rows)
            d_ap = block.gather(1, pos.index)
            thresholds = d_ap + margin
            bounds = _Bounds([thresholds, d_ap] if count_hard else [thresholds], pos.valid)
            placed = bounds.place(block)
            fill_same_label_(placed, columns[rows], has_same[rows], dump)
            buckets[rows] = placed
            placed += _row_offsets(len(placed), num_buckets, dis.device)
            flat = placed.view(-1)
            size = placed.numel() // num_cols * num_buckets
            histogram = torch.bincount(flat, minlength=size).view(-1, num_buckets)[:, :dump]
            sums = torch.bincount(flat, weights=block.reshape(-1), minlength=size)
            sums = sums.view(-1, num_buckets)[:, :dump]
            count = pos.count.unsqueeze(1)
            active_positives = count - bounds.below(0)
            backward_table[rows, :dump] = -active_positives.to(dis.dtype)
            cumulative = histogram.cumsum(dim=1)
            active = cumulative.gather(1, bounds.rank_of(0)) * pos.valid
            active_per_positive[rows] = active
            total = total + (active * thresholds).sum() - (active_positives * sums).sum()
            if count_hard:
                num_hard += ((count - bounds.below(1)) * histogram).sum()
        same_count = positives.count + int(ref_is_query)
        num_triplets = (positives.count * (num_cols - same_count)).sum()
        num_active = active_per_positive.sum()
        ctx.save_for_backward(buckets, active_per_positive, positives.index, backward_table)
        ctx.mark_non_differentiable(num_triplets, num_active, num_hard)
        return total, num_triplets, num_active, num_hard

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, *_):  # noqa: D102
        buckets, active_per_positive, index, backward_table = ctx.saved_tensors
        num_buckets = backward_table.shape[1]
        grad = backward_table.new_empty(buckets.shape)
        for rows in row_blocks(*buckets.shape):
            table = (backward_table[rows] * grad_total).view(-1)
            placed = buckets[rows].to(torch.int32)
            placed += _row_offsets(len(placed), num_buckets, placed.device)
            torch.index_select(table, 0, placed.view(-1), out=grad[rows].view(-1))
        grad.scatter_add_(1, index, active_per_positive.to(grad.dtype) * grad_total)
        return grad, None, None, None, None


def triplet_runs(
    dis: Tensor,
    positives: PositiveLists,
    ref_is_query: bool,
    lower_offset: float | None,
    upper_offset: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """All triplets (a, p, n) with lower_offset <= D[a, n] - D[a, p] < upper_offset.

    An offset of None leaves that side open. Per (a, n) the positives that qualify are one
    run of the positives sorted by D[a, p]: those with D[a, p] + lower_offset <= D[a, n] (a
    prefix) minus those with D[a, p] + upper_offset <= D[a, n] (a shorter prefix). One
    `searchsorted` over both kinds of bounds places every (a, n); per-row tables give the
    run's start and length. No N x N x K tensor is built: the cost is O(N M log K) plus the
    number of triplets returned.
    """
    anchors, pos_out, negs = [], [], []
    columns, has_same = same_label_columns(positives, ref_is_query)
    offsets = [offset for offset in (lower_offset, upper_offset) if offset is not None]
    for rows in row_blocks(*dis.shape):
        block = dis[rows]
        pos = _take_rows(positives, rows)
        d_ap = block.gather(1, pos.index)
        order = d_ap.masked_fill(~pos.valid, float("inf")).argsort(dim=1)
        sorted_index = pos.index.gather(1, order)
        bounds = _Bounds([d_ap + offset for offset in offsets] or [d_ap], pos.valid)
        count = pos.count.unsqueeze(1).expand(-1, bounds.num_buckets)
        end = count if lower_offset is None else bounds.below(0)
        start = torch.zeros_like(end) if upper_offset is None else bounds.below(len(offsets) - 1)
        # One more bucket, with an empty run, for the same-label entries.
        start = F.pad(start.to(torch.int32), (0, 1)).view(-1)
        lengths = F.pad((end - start.view(len(end), -1)[:, :-1]).clamp_min(0), (0, 1))
        num_buckets = lengths.shape[1]
        placed = bounds.place(block)
        fill_same_label_(placed, columns[rows], has_same[rows], num_buckets - 1)
        placed += _row_offsets(len(placed), num_buckets, dis.device)
        run_lengths = lengths.to(torch.int32).view(-1).index_select(0, placed.view(-1))
        (where,) = run_lengths.nonzero(as_tuple=True)
        run_length = run_lengths[where]
        first = start.index_select(0, placed.view(-1)[where])
        owner = torch.repeat_interleave(torch.arange(len(where), device=dis.device), run_length)
        within = (
            torch.arange(len(owner), device=dis.device)
            - (torch.cumsum(run_length, 0) - run_length)[owner]
        )
        anchor_row = torch.div(where, dis.shape[1], rounding_mode="floor")[owner]
        anchors.append(anchor_row + rows.start)
        pos_out.append(sorted_index[anchor_row, first[owner] + within])
        negs.append((where % dis.shape[1])[owner])
    return torch.cat(anchors), torch.cat(pos_out), torch.cat(negs)
