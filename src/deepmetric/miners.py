"""Miners: which pairs or triplets of a batch a loss should use (SPEC §3).

    tuples = miner(embeddings, labels, ref_emb=None, ref_labels=None)
    loss = loss_fn(embeddings, labels, indices_tuple=tuples)

A miner returns triplets (anchor, positive, negative) or pairs (anchor1, positive, anchor2,
negative) as a `MinedTuple`; anchors index the batch, the others the reference set. Mining
runs under `torch.no_grad()` on the distance matrix, vectorised over the batch; miners that
select among all triplets place negatives among each anchor's sorted positives
(`deepmetric.triplet_counting`) and never build an N x N x N tensor. Only the selected tuples
are materialised.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from deepmetric._validation import (
    CheckedBatch,
    HyperParameter,
    check_choice,
    check_count,
    check_finite,
    check_non_negative,
    check_positive,
)
from deepmetric.blocks import RowBlocks
from deepmetric.distances import BaseDistance, CosineSimilarity, EuclideanDistance
from deepmetric.pairwise import Relation, build_relation, check_pair_batch
from deepmetric.triplet_counting import fill_same_label_, triplet_runs
from deepmetric.tuples import MinedTuple, PositiveLists, reference_key


class BaseMiner(nn.Module):
    """Base of the miners: checks the inputs, computes the distance matrix without gradients,
    and tags the result with the reference set it indexes.

    Subclasses implement `mine(matrix, batch, relation)`, where `matrix` is the (N, M) output
    of `self.distance` turned so that smaller means closer (`BaseDistance.as_dissimilarity`:
    a similarity s enters as -s, so no miner branches on the orientation), `batch` the
    checked inputs and `relation` the positive and negative pairs
    (`deepmetric.pairwise.Relation`: labels, and the keyword-only `query_ids` / `ref_ids` of
    rows that are the same item and never paired). `mine` owns `matrix` and may overwrite
    it (the miners below do, to avoid (N, M) copies).
    """

    def __init__(self, distance: BaseDistance | None = None) -> None:
        super().__init__()
        self.distance = EuclideanDistance() if distance is None else distance

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        query_ids: Tensor | None = None,
        ref_ids: Tensor | None = None,
        relevance: Tensor | None = None,
    ) -> MinedTuple:
        """Mine index tuples from a batch and an optional reference set.

        `labels` are class ids (N,) or multi-hot label sets (N, L); `relevance` (N, M) may
        replace them; rows with equal `query_ids` / `ref_ids` are never paired (see
        `deepmetric.pairwise` and docs/labels.md).
        """
        batch, ids = check_pair_batch(
            embeddings,
            labels,
            ref_emb,
            ref_labels,
            query_ids=query_ids,
            ref_ids=ref_ids,
            relevance=relevance,
        )
        relation = build_relation(
            batch.labels, batch.ref_labels, len(batch.ref_emb), ids, batch.ref_is_query, relevance
        )
        with torch.no_grad():
            matrix = self.distance.as_dissimilarity(self.distance(batch.embeddings, batch.ref_emb))
            tuples = self.mine(matrix, batch, relation)
        return MinedTuple(tuples, reference_key(ref_emb))

    def mine(self, matrix: Tensor, batch: CheckedBatch, relation: Relation) -> tuple[Tensor, ...]:
        raise NotImplementedError


class AllPairsMiner(BaseMiner):
    """Every positive pair and every negative pair of the batch, as (a1, p, a2, n).

    Useful to hand explicit pairs to a loss; the loss alone already uses all pairs.
    """

    def mine(self, matrix, batch, relation):
        every = slice(0, len(matrix))
        positive, negative = relation.positive_mask(every), relation.negative_mask(every)
        return (*positive.nonzero(as_tuple=True), *negative.nonzero(as_tuple=True))


class PairMarginMiner(BaseMiner):
    """Pairs that violate a margin: positives with d > pos_margin, negatives with d < neg_margin
    (with a similarity: s < pos_margin and s > neg_margin). Returns (a1, p, a2, n).

    Args:
        pos_margin: positives beyond this are selected (distance units).
        neg_margin: negatives within this are selected (distance units).
    """

    pos_margin = HyperParameter(check_finite)
    neg_margin = HyperParameter(check_finite)

    def __init__(
        self,
        pos_margin: float = 0.2,
        neg_margin: float = 0.8,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def mine(self, matrix, batch, relation):
        positives = relation.positives
        pos_margin, neg_margin = (
            self.distance.as_dissimilarity(m) for m in (self.pos_margin, self.neg_margin)
        )
        violated = positives.valid & (matrix.gather(1, positives.index) > pos_margin)
        anchor1 = _row_numbers(positives.index).expand_as(violated)[violated]
        columns, has_same = relation.same_columns(slice(0, relation.num_query))
        anchor2, negative = [], []
        blocks = RowBlocks(*matrix.shape, passes=True)
        for rows in blocks:
            near = blocks.buffer("near", matrix, torch.bool)
            torch.lt(matrix[rows], neg_margin, out=near)
            fill_same_label_(near, columns[rows], has_same[rows], False)
            row, column = near.nonzero(as_tuple=True)
            anchor2.append(row + rows.start)
            negative.append(column)
        return anchor1, positives.index[violated], torch.cat(anchor2), torch.cat(negative)


class AllTripletsMiner(BaseMiner):
    """Every triplet (a, p, n) of the batch. The output has sum_a |P_a| |N_a| rows: use it for
    small batches or offline lists; losses compute the all-triplets case without it."""

    def mine(self, matrix, batch, relation):
        return triplet_runs(matrix, relation, None, None)


TRIPLET_TYPES = ("all", "hard", "semihard", "easy")


class TripletMarginMiner(BaseMiner):
    """Triplets by difficulty (Schroff et al. 2015; seed 002), with v = d(a, n) - d(a, p):

    - "all": every triplet with a non-zero hinge, v < margin;
    - "hard": the negative is closer than the positive, v < 0;
    - "semihard": 0 <= v < margin (FaceNet);
    - "easy": v >= margin (zero loss).

    For each (a, n) the qualifying positives are one run of the anchor's sorted positives,
    so the cost is O(N M log K) plus the number of triplets returned.

    Args:
        margin: the triplet margin, >= 0 (distance units), as in the loss it feeds.
        type_of_triplets: one of "all", "hard", "semihard", "easy".
    """

    margin = HyperParameter(check_non_negative)

    def __init__(
        self,
        margin: float = 0.2,
        type_of_triplets: str = "all",
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance)
        self.margin = margin
        self.type_of_triplets = check_choice(type_of_triplets, "type_of_triplets", TRIPLET_TYPES)

    def mine(self, matrix, batch, relation):
        lower, upper = {
            "all": (None, self.margin),
            "hard": (None, 0.0),
            "semihard": (0.0, self.margin),
            "easy": (self.margin, None),
        }[self.type_of_triplets]
        return triplet_runs(matrix, relation, lower, upper)


class BatchHardMiner(BaseMiner):
    """Batch-hard triplets (Hermans, Beyer & Leibe 2017, "In defense of the triplet loss"):
    for each anchor, its farthest positive and its nearest negative. Anchors lacking either
    are skipped. Returns (a, p, n), one triplet per anchor.
    """

    def mine(self, matrix, batch, relation):
        hardest_positive = torch.zeros(len(matrix), dtype=torch.long, device=matrix.device)
        hardest_negative = torch.zeros_like(hardest_positive)
        for rows in RowBlocks(*matrix.shape, passes=True):
            positives, same = relation.block_lists(rows)
            hardest_positive[rows] = _farthest_positive(matrix[rows], positives)
            hardest_negative[rows] = _nearest_negative(matrix[rows], same)[1]
        has_both = (relation.positive_count > 0) & (relation.num_negatives > 0)
        anchors = has_both.nonzero(as_tuple=True)[0]
        return anchors, hardest_positive[anchors], hardest_negative[anchors]


class HardNetMiner(BaseMiner):
    """HardNet triplets (Mishchuk et al. 2017): for each positive pair (a, p), the negative
    nearest to either member, min over n of min(d(a, n), d(p, n)).

    When the hardest negative is nearest to p, the triplet is returned as (p, a, n), so that
    the triplet loss term [d(p, a) - d(p, n) + m]+ is the HardNet term. Needs the batch as
    its own reference set (the "column" of p is then the row of p).
    """

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None, **pairing):
        if ref_emb is not None:
            raise ValueError(
                "HardNetMiner mines within the batch (both members of each pair must be anchors); "
                "put both sets in the batch with shared labels instead of passing ref_emb"
            )
        return super().forward(embeddings, labels, **pairing)

    def mine(self, matrix, batch, relation):
        nearest_value = matrix.new_empty(len(matrix))
        nearest = torch.zeros(len(matrix), dtype=torch.long, device=matrix.device)
        blocks = RowBlocks(*matrix.shape, passes=True)
        for rows in blocks:
            same = relation.same_columns(rows)
            nearest_value[rows], nearest[rows] = _nearest_negative(matrix[rows], same)
        # one triplet per positive pair whose anchor has a negative (and then so does the
        # positive, which shares its labels); written block by block into the output
        size = int(relation.positive_count[torch.isfinite(nearest_value)].sum())
        first, second, negative = (nearest.new_empty(size) for _ in range(3))
        start = 0
        for rows in blocks:
            positives = relation.positive_rows(rows)
            keep = positives.valid & torch.isfinite(nearest_value[rows]).unsqueeze(1)
            anchor = _row_numbers(positives.index).add_(rows.start).expand_as(keep)[keep]
            pos = positives.index[keep]
            from_positive = nearest_value[pos] < nearest_value[anchor]
            stop = start + len(pos)
            torch.where(from_positive, pos, anchor, out=first[start:stop])
            torch.where(from_positive, anchor, pos, out=second[start:stop])
            torch.index_select(nearest, 0, first[start:stop], out=negative[start:stop])
            start = stop
        return first, second, negative


class DistanceWeightedMiner(BaseMiner):
    """Distance-weighted sampling (Wu, Manmatha, Smola & Krähenbühl 2017, "Sampling matters").

    Embeddings are normalised to the unit sphere, where pairwise distances of random points
    in dimension n have density q(d) ∝ d^(n-2) [1 - d^2/4]^((n-3)/2). For each positive pair
    (a, p) one negative is drawn with probability ∝ 1 / q(max(d(a, n), cutoff)), and negatives
    with d(a, n) >= nonzero_loss_cutoff get weight 0 (they give no loss). If an anchor has no
    negative within the cutoff, one is drawn uniformly among its negatives. Returns (a, p, n).

    Args:
        cutoff: distances below this are clipped to it (the paper's 0.5), so near-duplicates
            do not dominate.
        nonzero_loss_cutoff: negatives at or beyond this distance are never drawn (1.4).
        generator: a torch.Generator for reproducible draws.
    """

    cutoff = HyperParameter(check_positive)
    nonzero_loss_cutoff = HyperParameter(check_positive)

    def __init__(
        self,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(EuclideanDistance(normalize_embeddings=True))
        if not 0 < cutoff < nonzero_loss_cutoff <= 2:
            raise ValueError(
                "need 0 < cutoff < nonzero_loss_cutoff <= 2 (distances of unit vectors), got "
                f"cutoff={cutoff}, nonzero_loss_cutoff={nonzero_loss_cutoff}"
            )
        self.cutoff, self.nonzero_loss_cutoff = cutoff, nonzero_loss_cutoff
        self.generator = generator

    def mine(self, matrix, batch, relation):
        positives = relation.positives
        columns, has_same = relation.same_columns(slice(0, relation.num_query))
        has_negative = relation.num_negatives > 0
        dim = batch.embeddings.shape[1]
        blocks = RowBlocks(*matrix.shape, passes=True)
        for rows in blocks:
            block = matrix[rows]  # turned into the sampling weights, in place
            d = torch.clamp(block, min=self.cutoff, out=blocks.buffer("log_w", matrix))
            # log q(d) = (n - 2) log d + (n - 3) / 2 log(1 - d^2 / 4), as the paper writes it
            tail = torch.square(d, out=blocks.buffer("tail", matrix))
            tail.mul_(0.25).neg_().add_(1).clamp_min_(1e-8).log_()
            log_w = d.log_().mul_(dim - 2).add_(tail.mul_((dim - 3) / 2)).neg_()
            log_w.masked_fill_(block >= self.nonzero_loss_cutoff, -math.inf)
            fill_same_label_(log_w, columns[rows], has_same[rows], -math.inf)
            uniform = log_w.amax(dim=1) == -math.inf
            if bool(uniform.any()):  # no negative within the cutoff: draw among all negatives
                fallback = torch.zeros_like(log_w[uniform])
                picked = uniform.nonzero(as_tuple=True)[0]
                fill_same_label_(fallback, columns[rows][picked], has_same[rows][picked], -math.inf)
                log_w[uniform] = fallback
            torch.sub(log_w, log_w.amax(dim=1, keepdim=True), out=block).exp_()
            block.masked_fill_(~has_negative[rows].unsqueeze(1), 1.0)
        draws = torch.multinomial(
            matrix, positives.index.shape[1], replacement=True, generator=self.generator
        )
        keep = positives.valid & has_negative.unsqueeze(1)
        anchor = _row_numbers(positives.index).expand_as(keep)
        return anchor[keep], positives.index[keep], draws[keep]


class RankWindowMiner(BaseMiner):
    """Negatives from a window of ranks (Huang et al. 2020, Facebook EBR; seed 002).

    Each anchor's negatives are ranked from nearest (rank 1) on; for each positive pair
    (a, p), `negatives_per_positive` negatives are drawn uniformly from ranks
    window[0]..window[1] (inclusive), "similar but not too similar". Anchors with fewer than
    window[0] negatives give no triplet. Returns (a, p, n).

    Args:
        window: (first rank, last rank), 1-based, inclusive; e.g. (101, 500).
        negatives_per_positive: negatives drawn for each positive pair.
        generator: a torch.Generator for reproducible draws.
    """

    negatives_per_positive = HyperParameter(check_count)

    def __init__(
        self,
        window: tuple[int, int] = (101, 500),
        negatives_per_positive: int = 1,
        distance: BaseDistance | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(distance)
        first, last = window
        if not 1 <= first <= last:
            raise ValueError(
                f"window must be (first, last) ranks with 1 <= first <= last, got {window}"
            )
        self.window = (int(first), int(last))
        self.negatives_per_positive = negatives_per_positive
        self.generator = generator

    def mine(self, matrix, batch, relation):
        positives = relation.positives
        columns, has_same = relation.same_columns(slice(0, relation.num_query))
        fill_same_label_(matrix, columns, has_same, math.inf)
        first, last = self.window
        depth = min(last, matrix.shape[1])
        ranked_value, ranked = matrix.topk(depth, dim=1, largest=False)
        window_size = (torch.isfinite(ranked_value).sum(dim=1) - (first - 1)).clamp_min(0)
        shape = (*positives.index.shape, self.negatives_per_positive)
        uniform = torch.rand(shape, generator=self.generator, device=matrix.device)
        pick = (first - 1) + (uniform * window_size.view(-1, 1, 1)).long()
        keep = (positives.valid & (window_size > 0).unsqueeze(1)).unsqueeze(2).expand(shape)
        anchor = torch.arange(len(matrix), device=matrix.device).view(-1, 1, 1).expand(shape)
        pos = positives.index.unsqueeze(2).expand(shape)
        neg = ranked.gather(1, pick.clamp_max(depth - 1).view(len(matrix), -1)).view(shape)
        return anchor[keep], pos[keep], neg[keep]


def _row_numbers(table: Tensor) -> Tensor:
    """(N, 1) row indices of an (N, K) table."""
    return torch.arange(len(table), device=table.device).unsqueeze(1)


def _nearest_negative(dis: Tensor, same: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Each row's nearest negative in a block of dissimilarities (smaller is closer), given
    the block's `Relation.same_columns`: (value, column), +inf where there is none.

    Overwrites the entries of `dis` that are not negatives; ties go to the lowest column.
    """
    fill_same_label_(dis, *same, math.inf)
    return dis.min(dim=1)


def _farthest_positive(dis: Tensor, positives: PositiveLists) -> Tensor:
    """Each row's farthest positive column in a block of dissimilarities (lowest column on
    ties; 0 where none)."""
    values = dis.gather(1, positives.index)
    slot = values.masked_fill(~positives.valid, -math.inf).argmax(dim=1, keepdim=True)
    return positives.index.gather(1, slot).squeeze(1)


class MultiSimilarityMiner(BaseMiner):
    """Pair mining of the multi-similarity loss (Wang, Han, Huang, Dong & Scott 2019, eq. 7-8).

    For anchor i with similarities s to its positives P_i and negatives N_i:

        keep negative n  if  s_in + epsilon > min_{p in P_i} s_ip
        keep positive p  if  s_ip - epsilon < max_{n in N_i} s_in

    i.e. the negatives that come close to the hardest positive and the positives that come
    close to the hardest negative. An anchor without positives keeps no negative and one
    without negatives keeps no positive. With a distance d, s = -d. Returns pairs
    (a1, p, a2, n); their number depends on the data.

    Args:
        epsilon: slack, >= 0 (similarity units, or distance units for a distance).
        distance: default cosine similarity.

    Example:
        >>> miner = MultiSimilarityMiner(epsilon=0.1)
        >>> a1, p, a2, n = miner(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    epsilon = HyperParameter(check_non_negative)

    def __init__(self, epsilon: float = 0.1, distance: BaseDistance | None = None) -> None:
        super().__init__(CosineSimilarity() if distance is None else distance)
        self.epsilon = epsilon

    def mine(self, matrix, batch, relation):
        # on the dissimilarity d = -s: s + eps > s_p  <=>  d - eps < d_p (exactly, in floats)
        every = slice(0, len(matrix))
        positive, negative = relation.positive_mask(every), relation.negative_mask(every)
        hardest_pos = matrix.masked_fill(~positive, -math.inf).amax(dim=1, keepdim=True)
        hardest_neg = matrix.masked_fill(~negative, math.inf).amin(dim=1, keepdim=True)
        keep_neg = negative & (matrix - self.epsilon < hardest_pos)
        keep_pos = positive & (matrix + self.epsilon > hardest_neg)
        return (*keep_pos.nonzero(as_tuple=True), *keep_neg.nonzero(as_tuple=True))

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"


__all__ = [
    "AllPairsMiner",
    "AllTripletsMiner",
    "BaseMiner",
    "BatchHardMiner",
    "DistanceWeightedMiner",
    "HardNetMiner",
    "MultiSimilarityMiner",
    "PairMarginMiner",
    "RankWindowMiner",
    "TripletMarginMiner",
]
