"""Temperature-softmax losses over in-batch pairs (SPEC §4): N-pair, NT-Xent / InfoNCE, SupCon.

Each anchor's similarities to the reference set (the batch itself unless `ref_emb` is given)
are logits s / T; positives (same label) should win a softmax against the negatives (another
label). Several positives per anchor are allowed. A distance d enters as the similarity -d.
Computed one block of anchor rows at a time with masked, max-shifted log-sum-exp, so
temperatures as small as 0.01 stay finite in float32 and memory stays O(N M) at most.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric._validation import check_flag, check_non_negative, check_positive
from deepmetric.distances import (
    BaseDistance,
    CosineSimilarity,
    DotProductSimilarity,
    safe_sqrt,
)
from deepmetric.losses._blocks import (
    StructuredStats,
    count_terms,
    finish_sum,
    masked_logsumexp,
    new_counts,
    setup_pairs,
)
from deepmetric.losses.base import MetricLoss, any_distance, checked


def _pairwise_softmax(
    embeddings, labels, indices_tuple, ref_emb, ref_labels, temperature, distance, ids
):
    """sum over positive pairs (a, p) of -log(e^(s_ap/T) / (e^(s_ap/T) + sum_n e^(s_an/T)))."""
    inputs, pairs, sweep = setup_pairs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, distance, ids=ids
    )
    counts = new_counts(inputs)

    def objective(block: Tensor, rows: slice) -> Tensor:
        logits = distance.as_similarity(block) / temperature
        positives = pairs.positive_rows(rows)
        negatives = masked_logsumexp(logits, pairs.negative_mask(rows))
        # -log(e^x / (e^x + e^L)) = softplus(L - x); no negative (L = -inf) gives 0.
        terms = F.softplus(negatives.unsqueeze(1) - logits.gather(1, positives.index))
        terms = terms * positives.valid
        count_terms(counts, terms, positives.valid)
        return terms.sum()

    return inputs, sweep, sweep.run(objective), counts


@checked(any_distance(CosineSimilarity), temperature=check_positive)
def ntxent_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    temperature: float = 0.07,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, StructuredStats]:
    """NT-Xent / InfoNCE loss (van den Oord, Li & Vinyals 2018; Chen, Kornblith, Norouzi &
    Hinton 2020).

        L(a, p) = -log( exp(s_ap / T) / (exp(s_ap / T) + sum_{n in N_a} exp(s_an / T)) )

    for every positive pair (a, p), the other positives of a left out of the denominator
    (as pytorch-metric-learning's NTXentLoss); averaged over the positive pairs. SimCLR is the
    case of two views per image: label each view pair with its own id.

    Args:
        temperature: T, > 0 (similarity units); 0.07 (MoCo) and 0.1-0.5 (SimCLR) are usual.
        distance: default cosine similarity; a distance d enters as s = -d.
        reduction: "mean" over positive pairs, "nonzero_mean" or "sum".
        return_stats: also return a `StructuredStats` (terms: positive pairs).

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> ntxent_loss(x, y, temperature=0.1) >= 0
        tensor(True)
    """
    inputs, sweep, total, counts = _pairwise_softmax(
        embeddings,
        labels,
        indices_tuple,
        ref_emb,
        ref_labels,
        temperature,
        distance,
        (query_ids, ref_ids, relevance),
    )
    return finish_sum(inputs, sweep, total, counts, reduction, return_stats)


@checked(any_distance(DotProductSimilarity), l2_reg_weight=check_non_negative)
def npairs_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    l2_reg_weight: float = 0.002,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, StructuredStats]:
    """Multi-class N-pair loss (Sohn 2016; survey eq. 4).

        L = -1/|P| sum_{(i, j) in P} log( exp(S_ij) / (exp(S_ij) + sum_{k: y_k != y_i} exp(S_ik)) )
            + lambda / m sum_i ||f(x_i)||_2

    with S the dot product of the raw embeddings (Sohn) and m the batch size. Every positive
    pair of the batch is used (survey eq. 4); Sohn's N-pair batches (one pair per class) are
    the special case of two items per class. The penalty is on the unsquared norms of the batch
    embeddings as the survey writes it (TensorFlow's npairs_loss squares them).

    Args:
        l2_reg_weight: lambda, >= 0 (0.002 as in TensorFlow's implementation of the paper).
        distance: default dot product; a distance d enters as S = -d.
        reduction: applied to the softmax part: "mean" over positive pairs, "nonzero_mean",
            "sum".
        return_stats: also return a `StructuredStats` (terms: positive pairs).

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> npairs_loss(x, y) >= 0
        tensor(True)
    """
    inputs, sweep, total, counts = _pairwise_softmax(
        embeddings,
        labels,
        indices_tuple,
        ref_emb,
        ref_labels,
        1.0,
        distance,
        (query_ids, ref_ids, relevance),
    )
    penalty = None
    if l2_reg_weight > 0:
        norms = safe_sqrt(inputs.embeddings.pow(2).sum(dim=1))
        penalty = l2_reg_weight * norms.mean()
    return finish_sum(inputs, sweep, total, counts, reduction, return_stats, penalty)


@checked(any_distance(CosineSimilarity), temperature=check_positive, weight_positives=check_flag)
def supcon_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    temperature: float = 0.1,
    weight_positives: bool = False,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, StructuredStats]:
    """Supervised contrastive loss, L_out form (Khosla, Teterwak, Wang, Sarna, Tian, Isola,
    Maschinot, Liu & Krishnan 2020, eq. 2).

        L_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / T) / sum_{a in A(i)} exp(s_ia / T) )

    with P(i) the positives of anchor i and A(i) all its pairs (every other item; with an
    `indices_tuple`, the mined positives and negatives). Averaged over anchors with a positive.

    Args:
        temperature: T, > 0 (similarity units); the paper uses 0.1.
        weight_positives: weight each positive by its overlap with the anchor, w_ip = |Y_i &
            Y_p| / |Y_i | Y_p| (Jaccard) for multi-hot labels or the relevance value for a
            `relevance` matrix, and average with these weights instead of 1/|P(i)| (the
            multi-label SupCon form); no effect with class ids (every weight is 1).
        distance: default cosine similarity; a distance d enters as s = -d.
        reduction: "mean" over anchors with a positive, "nonzero_mean" or "sum".
        return_stats: also return a `StructuredStats` (terms: anchors with a positive).

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> supcon_loss(x, y) >= 0
        tensor(True)
    """
    ids = (query_ids, ref_ids, relevance)
    inputs, pairs, sweep = setup_pairs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, distance, ids=ids
    )
    counts = new_counts(inputs)

    def objective(block: Tensor, rows: slice) -> Tensor:
        logits = distance.as_similarity(block) / temperature
        positives = pairs.positive_rows(rows)
        has_positive = positives.count > 0
        denominator = masked_logsumexp(logits, pairs.pair_mask(rows))
        if weight_positives:
            weights = pairs.positive_weights(rows, positives).to(logits.dtype)
        else:
            weights = positives.valid.to(logits.dtype)
        has_positive = has_positive & (weights.sum(dim=1) > 0)
        pos_mean = (logits.gather(1, positives.index) * weights).sum(dim=1)
        pos_mean = pos_mean / weights.sum(dim=1).clamp_min(torch.finfo(logits.dtype).tiny)
        safe = denominator.masked_fill(~has_positive, 0)
        terms = (safe - pos_mean).masked_fill(~has_positive, 0)
        count_terms(counts, terms, has_positive)
        return terms.sum()

    total = sweep.run(objective)
    return finish_sum(inputs, sweep, total, counts, reduction, return_stats)


class NTXentLoss(MetricLoss):
    """NT-Xent / InfoNCE loss module; see `ntxent_loss` for the formula and arguments.

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.1)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(ntxent_loss)
    local_anchor_supported = True


class NPairsLoss(MetricLoss):
    """Multi-class N-pair loss module; see `npairs_loss` for the formula and arguments.

    Example:
        >>> loss_fn = NPairsLoss(l2_reg_weight=0.002)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(npairs_loss)

    @property
    def local_anchor_supported(self) -> bool:
        """True unless an extra term with a count of its own is added (see the reason)."""
        return self.l2_reg_weight == 0

    local_anchor_reason = (
        "its L2 penalty is averaged over the batch rows while the softmax terms are averaged "
        "over the positive pairs (set l2_reg_weight=0 to run locally)"
    )


class SupConLoss(MetricLoss):
    """Supervised contrastive loss module; see `supcon_loss` for the formula and arguments.

    Example:
        >>> loss_fn = SupConLoss(temperature=0.1)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(supcon_loss)
    local_anchor_supported = True
