"""Counting and selecting triplets per anchor without enumerating them.

For an anchor a with positives p (few: K - 1 in a P x K batch) and negatives n (many), every
triplet condition used by the triplet loss and its miners compares d(a, n) with a threshold
that depends on p alone (d(a, p), or d(a, p) + margin). Sorting each anchor's K thresholds and
placing every negative among them with `searchsorted` gives, for each (a, n), the number of
positives whose threshold is <= d(a, n): all counts follow from it in O(N M log K) time, and
the triplets satisfying a condition form one contiguous run of sorted positives per (a, n).

Work is done in blocks of anchor rows so the temporaries stay bounded for any batch size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from deepmetric.tuples import PositiveLists

BLOCK_ELEMENTS = 1 << 22


def row_blocks(num_rows: int, num_cols: int) -> Iterator[slice]:
    """Slices of rows whose blocks hold about BLOCK_ELEMENTS entries each."""
    step = max(1, BLOCK_ELEMENTS // max(num_cols, 1))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


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


def _take_rows(positives: PositiveLists, rows: slice) -> PositiveLists:
    return PositiveLists(positives.index[rows], positives.valid[rows], positives.count[rows])


class AllTripletsHinge(torch.autograd.Function):
    """sum over all triplets (a, p, n) of [D[a, p] - D[a, n] + margin]+, exactly, in O(N M log K).

    For each positive p of anchor a, c_p = #{n : D[a, n] < D[a, p] + margin} (its active
    negatives); for each negative n, k_n = #{p : D[a, p] + margin > D[a, n]} (its active
    positives). Then the sum is sum_p c_p (D[a, p] + margin) - sum_n k_n D[a, n], and the
    gradient with respect to D is c_p at (a, p) and -k_n at (a, n), both from the same counts.

    forward returns (sum, number of triplets, number of active triplets, number of hard
    triplets with D[a, n] < D[a, p]); only the sum is differentiable.
    """

    @staticmethod
    def forward(ctx, dis, labels, ref_labels, positives, margin):  # noqa: D102
        num_rows, num_cols = dis.shape
        width = positives.index.shape[1]
        dump = width + 1
        bucket_dtype = torch.uint8 if dump <= 255 else torch.int32
        buckets = torch.empty(dis.shape, dtype=bucket_dtype, device=dis.device)
        active_per_positive = torch.zeros(
            positives.index.shape, dtype=torch.long, device=dis.device
        )
        total = dis.new_zeros(())
        num_triplets = dis.new_zeros((), dtype=torch.long)
        num_hard = dis.new_zeros((), dtype=torch.long)
        for rows in row_blocks(num_rows, num_cols):
            block = dis[rows]
            pos = _take_rows(positives, rows)
            negatives = negative_mask(labels[rows], ref_labels)
            d_ap = block.gather(1, pos.index)
            thresholds, order = sorted_positive_values(d_ap + margin, pos)
            below = count_at_most(thresholds, block).masked_fill_(~negatives, dump)
            buckets[rows] = below
            offsets = torch.arange(below.shape[0], device=dis.device).unsqueeze(1) * (dump + 1)
            histogram = torch.bincount(
                (below + offsets).view(-1), minlength=offsets.numel() * (dump + 1)
            )
            active_sorted = histogram.view(-1, dump + 1)[:, :width].cumsum(dim=1)
            active = torch.zeros_like(active_sorted).scatter_(1, order, active_sorted) * pos.valid
            active_per_positive[rows] = active
            active_positives = (pos.count.unsqueeze(1) - below).clamp_min(0) * negatives
            total = total + (active * (d_ap + margin)).sum() - (active_positives * block).sum()
            num_triplets += (pos.count * negatives.sum(dim=1)).sum()
            sorted_d_ap, _ = sorted_positive_values(d_ap, pos)
            hard = (pos.count.unsqueeze(1) - count_at_most(sorted_d_ap, block)) * negatives
            num_hard += hard.sum()
        ctx.save_for_backward(buckets, active_per_positive, positives.index, positives.count)
        ctx.width = width
        num_active = active_per_positive.sum()
        ctx.mark_non_differentiable(num_triplets, num_active, num_hard)
        return total, num_triplets, num_active, num_hard

    @staticmethod
    def backward(ctx, grad_total, *_):  # noqa: D102
        buckets, active_per_positive, index, count = ctx.saved_tensors
        grad = torch.empty(buckets.shape, dtype=grad_total.dtype, device=buckets.device)
        for rows in row_blocks(*buckets.shape):
            below = buckets[rows].long()
            negatives = below <= ctx.width
            grad[rows] = -(count[rows].unsqueeze(1) - below).clamp_min(0) * negatives
        grad.scatter_add_(1, index, active_per_positive.to(grad.dtype))
        return grad * grad_total, None, None, None, None


def triplet_runs(
    dis: Tensor,
    labels: Tensor,
    ref_labels: Tensor,
    positives: PositiveLists,
    lower_offset: float | None,
    upper_offset: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """All triplets (a, p, n) with lower_offset <= D[a, n] - D[a, p] < upper_offset.

    An offset of None leaves that side open. Per (a, n) the positives that qualify are one
    run of the sorted positives, so the triplets are produced without any N x N x K tensor:
    the cost is O(N M log K) plus the number of triplets returned.
    """
    anchors, pos_out, negs = [], [], []
    for rows in row_blocks(*dis.shape):
        block = dis[rows]
        pos = _take_rows(positives, rows)
        negatives = negative_mask(labels[rows], ref_labels)
        d_ap = block.gather(1, pos.index)
        sorted_d_ap, order = sorted_positive_values(d_ap, pos)
        sorted_index = pos.index.gather(1, order)
        # D[a,n] - D[a,p] >= lower  <=>  D[a,p] <= D[a,n] - lower: the first `end` sorted slots.
        end = (
            pos.count.unsqueeze(1).expand_as(block)
            if lower_offset is None
            else count_at_most(sorted_d_ap, block - lower_offset)
        )
        # D[a,n] - D[a,p] < upper  <=>  D[a,p] > D[a,n] - upper: slots from `start` on.
        start = (
            torch.zeros_like(end)
            if upper_offset is None
            else count_at_most(sorted_d_ap, block - upper_offset)
        )
        lengths = (end.minimum(pos.count.unsqueeze(1)) - start).clamp_min(0) * negatives
        row, neg = lengths.nonzero(as_tuple=True)
        run_length = lengths[row, neg]
        first = start[row, neg]
        owner = torch.repeat_interleave(torch.arange(len(row), device=dis.device), run_length)
        within = (
            torch.arange(len(owner), device=dis.device)
            - (torch.cumsum(run_length, 0) - run_length)[owner]
        )
        anchor_row = row[owner]
        anchors.append(anchor_row + rows.start)
        pos_out.append(sorted_index[anchor_row, first[owner] + within])
        negs.append(neg[owner])
    return torch.cat(anchors), torch.cat(pos_out), torch.cat(negs)
