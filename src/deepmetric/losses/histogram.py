"""Histogram loss (SPEC §4): the probability that a negative pair looks closer than a positive.

Soft histograms of the positive and negative similarities are accumulated one block of anchor
rows at a time (no pair is enumerated); the gradient follows in a second sweep through the
linear interpolation weights. O(N M) time, O(block + bins) extra memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric._validation import check_count, check_finite
from deepmetric.blocks import Sweep
from deepmetric.distances import BaseDistance, CosineSimilarity
from deepmetric.losses._blocks import PairSets, setup_pairs
from deepmetric.losses.base import MetricLoss, any_distance, checked
from deepmetric.losses.reduction import zero_with_graph


@dataclass(frozen=True)
class HistogramStats:
    """Pair counts from the last histogram loss call (0-dim tensors)."""

    num_pos_pairs: Tensor
    num_neg_pairs: Tensor


def check_value_range(value: object, name: str) -> tuple[float, float] | None:
    """`value` as (low, high) floats with low < high, or None; an error naming `name` otherwise."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high) or None, got {value!r}")
    low, high = (check_finite(v, name) for v in value)
    if not low < high:
        raise ValueError(f"{name} must be (low, high) with low < high, got {value}")
    return low, high


@checked(any_distance(CosineSimilarity), n_bins=check_count, value_range=check_value_range)
def histogram_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    n_bins: int = 100,
    value_range: tuple[float, float] | None = None,
    distance: BaseDistance | None = None,
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, HistogramStats]:
    """Histogram loss (Ustinova & Lempitsky 2016).

    The similarity range [low, high] is cut into `n_bins` bins of width delta, with nodes
    t_r = low + r delta, r = 0..n_bins. Each pair adds to its two neighbouring nodes with
    linear weights, (t_{r+1} - s) / delta to t_r and (s - t_r) / delta to t_{r+1}; h+ and h-
    are these soft histograms over the positive and the negative pairs, each normalised to
    sum 1. The loss estimates P(s_negative > s_positive):

        L = sum_r h-_r Phi+_r,   Phi+_r = sum_{q <= r} h+_q

    It is 1 for a collapsed batch (every similarity equal) and 0 when every positive
    similarity exceeds every negative one by more than a bin. The loss is already one number:
    there is no reduction. A batch without positive or without negative pairs gives 0.

    Args:
        n_bins: number of bins (the paper's R - 1), >= 1; pytorch-metric-learning's default 100.
        value_range: (low, high) of the similarity, or of the distance when `distance` is one;
            default (-1, 1) for similarities, (0, 2) for distances (unit-length embeddings).
            Values outside are clamped (zero gradient there).
        distance: default cosine similarity (the paper); a distance d enters as s = -d.
        return_stats: also return a `HistogramStats`.

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> 0 <= histogram_loss(x, y, n_bins=20) <= 1
        tensor(True)
    """
    low, high = _similarity_range(value_range, distance)
    ids = (query_ids, ref_ids, relevance)
    inputs, pairs, sweep = setup_pairs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, distance, ids=ids
    )
    bins = _Bins(low, (high - low) / n_bins, n_bins, distance)
    hist_pos, hist_neg, num_pos, num_neg = _soft_histograms(sweep, pairs, bins)
    if int(num_pos) == 0 or int(num_neg) == 0:
        loss = zero_with_graph(inputs.embeddings, inputs.ref_emb)
    else:
        with torch.enable_grad():
            density_pos = (hist_pos / num_pos).requires_grad_()
            density_neg = (hist_neg / num_neg).requires_grad_()
            value = (density_neg * density_pos.cumsum(0)).sum()
            grad_pos, grad_neg = torch.autograd.grad(value, [density_pos, density_neg])
        dtype = inputs.embeddings.dtype
        slope_pos = bins.slopes(grad_pos, num_pos).to(dtype)
        slope_neg = bins.slopes(grad_neg, num_neg).to(dtype)

        def block_gradient(block: Tensor, rows: slice) -> Tensor:
            positives = pairs.positive_rows(rows)
            grad = bins.slope_of(slope_neg, block, pairs.non_negative_mask(rows))
            pos_grad = bins.slope_of(slope_pos, block.gather(1, positives.index), ~positives.valid)
            return grad.scatter_add_(1, positives.index, pos_grad)

        sweep.run_gradient(block_gradient, partial(_plain_histogram_loss, pairs, bins))
        loss = sweep.result(value.detach().to(dtype))
    loss = inputs.finish(loss)
    if not return_stats:
        return loss
    return loss, HistogramStats(num_pos_pairs=num_pos, num_neg_pairs=num_neg)


class _Bins:
    """The node axis of the histograms: n_bins bins of width `step` from `low`, in the
    similarity orientation (a distance d enters as s = -d)."""

    def __init__(self, low: float, step: float, n_bins: int, distance: BaseDistance) -> None:
        self.low, self.step, self.n_bins, self.distance = low, step, n_bins, distance

    def positions(self, block: Tensor) -> Tensor:
        """Each value's position on the node axis, in bins: 0 at low, n_bins at high."""
        return self.distance.as_similarity(block).sub(self.low).div_(self.step)

    def accumulate(self, hist: Tensor, block: Tensor, excluded: Tensor) -> None:
        """Add each value to its two nodes with weights (1 - frac) and frac; skip `excluded`."""
        n_bins = self.n_bins
        position = self.positions(block).clamp_(0, n_bins)
        lower = position.floor().clamp_(max=n_bins - 1)
        frac = position.sub_(lower).masked_fill_(excluded, 0).flatten()
        index = lower.masked_fill_(excluded, n_bins + 1).to(torch.int32).flatten()
        counts = torch.bincount(index, minlength=n_bins + 2)[: n_bins + 1].double()
        upper = torch.bincount(index, frac, minlength=n_bins + 2)[: n_bins + 1].double()
        hist += counts - upper
        hist[1:] += upper[:-1]

    def slopes(self, grad: Tensor, count: Tensor) -> Tensor:
        """d loss / d value for a value in each bin, from d loss / d density at the nodes:
        the share coef[lower] (1 - frac) + coef[lower + 1] frac has the slope of its bin;
        index 0 and n_bins + 1 (outside the range, or not a pair) give 0."""
        slope = (grad[1:] - grad[:-1]) * (-self.distance.sign / (float(count) * self.step))
        return F.pad(slope, (1, 1))

    def slope_of(self, slope: Tensor, block: Tensor, excluded: Tensor) -> Tensor:
        """Each value's slope: bin r holds positions in (r, r + 1], found by ceil."""
        position = self.positions(block)
        index = position.ceil_().clamp_(0, self.n_bins + 1).masked_fill_(excluded, 0)
        return slope.index_select(0, index.to(torch.int32).flatten()).view(position.shape)


def _soft_histograms(sweep: Sweep, pairs: PairSets, bins: _Bins):
    """Sweep 1: the soft histograms of the positive and negative pairs (float64) and the
    numbers of pairs."""
    device = sweep.query.device
    hist_pos = torch.zeros(bins.n_bins + 1, dtype=torch.float64, device=device)
    hist_neg = torch.zeros_like(hist_pos)
    num_pos = torch.zeros((), dtype=torch.long, device=device)
    num_neg = torch.zeros_like(num_pos)
    for rows, block in sweep.blocks():
        positives = pairs.positive_rows(rows)
        excluded = pairs.non_negative_mask(rows)
        bins.accumulate(hist_pos, block.gather(1, positives.index), ~positives.valid)
        bins.accumulate(hist_neg, block, excluded)
        num_pos += positives.count.sum()
        num_neg += excluded.numel() - excluded.sum()
    return hist_pos, hist_neg, num_pos, num_neg


def _plain_histogram_loss(pairs: PairSets, bins: _Bins, matrix: Tensor, rows: slice) -> Tensor:
    """The loss by plain differentiable steps on the whole matrix (the sweep's replay, for
    second derivatives): the soft histograms by `index_add` of the interpolation weights."""
    position = bins.positions(matrix).clamp(0, bins.n_bins)
    lower = position.detach().floor().clamp_(max=bins.n_bins - 1)
    frac = position - lower
    lower = lower.long()

    def density(mask: Tensor) -> Tensor:
        hist = frac.new_zeros(bins.n_bins + 1).index_add(0, lower[mask], 1 - frac[mask])
        hist = hist.index_add(0, lower[mask] + 1, frac[mask])
        return hist / mask.sum()

    negatives = ~pairs.non_negative_mask(rows)
    return (density(negatives) * density(pairs.positive_mask(rows)).cumsum(0)).sum()


def _similarity_range(
    value_range: tuple[float, float] | None, distance: BaseDistance
) -> tuple[float, float]:
    """The similarity range [low, high] the bins cover (for a distance, that of -d)."""
    if value_range is None:
        value_range = (0.0, 2.0) if distance.sign > 0 else (-1.0, 1.0)
    low, high = sorted(-distance.sign * value for value in value_range)
    return low, high


class HistogramLoss(MetricLoss):
    """Histogram loss module; see `histogram_loss` for the formula and arguments.

    `stats` holds the `HistogramStats` of the last call. The loss is one probability, so the
    module has no reduction.

    Example:
        >>> loss_fn = HistogramLoss(n_bins=50)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(histogram_loss)
    local_anchor_supported = False
    local_anchor_reason = (
        "its histograms are normalised over every pair of the whole batch, so it is not a sum"
        " of per-anchor terms"
    )
