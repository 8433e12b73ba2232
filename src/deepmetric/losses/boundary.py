"""Boundary losses (SPEC §4): ranked list loss and margin loss.

Both put a boundary in distance space: positives should lie inside it (within alpha - margin,
or beta - margin), negatives outside (beyond alpha, or beta + margin). They work on the (N, M)
matrix between the batch and the reference set one block of anchor rows at a time, like the
other structured losses; a similarity s enters as the dissimilarity -s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric._validation import (
    check_count,
    check_finite,
    check_non_negative,
    check_range,
    optional,
)
from deepmetric.blocks import Sweep
from deepmetric.distances import BaseDistance, EuclideanDistance
from deepmetric.losses._blocks import (
    PairSets,
    StructuredStats,
    count_terms,
    finish_sum,
    masked_softmax,
    new_counts,
    prepare_call,
    setup_pairs,
)
from deepmetric.losses.base import MetricLoss, any_distance, checked


@checked(
    any_distance(EuclideanDistance),
    margin=check_non_negative,
    Tn=check_non_negative,
    imbalance=check_range(0, 1, ""),
    alpha=optional(check_finite),
    Tp=check_non_negative,
)
def ranked_list_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 0.4,
    Tn: float = 10.0,  # noqa: N803 (pytorch-metric-learning's name)
    imbalance: float = 0.5,
    alpha: float | None = None,
    Tp: float = 0.0,  # noqa: N803
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, StructuredStats]:
    """Ranked list loss (Wang, Hua, Kodirov, Hu, Garnier & Robertson 2019).

    Negatives should lie beyond alpha, positives within alpha - m (m = `margin`). For anchor
    i, with the violating pairs P* = {p : D_ip > alpha - m} and N* = {n : D_in < alpha}:

        L_P = sum_{P*} w_p (D_ip - alpha + m) / sum_{P*} w_p,   w_p = exp(Tp (D_ip - alpha + m))
        L_N = sum_{N*} w_n (alpha - D_in) / sum_{N*} w_n,       w_n = exp(Tn (alpha - D_in))
        L_i = (1 - imbalance) L_P + imbalance L_N

    The weights are constants in backpropagation, as in the paper's gradient (pytorch-metric-
    learning differentiates through them). imbalance = 0.5 is the paper's lambda = 1 up to a
    factor 1/2. Averaged over the anchors that have a pair.

    Args:
        margin: gap between the positive and negative boundaries, >= 0 (distance units).
        Tn: temperature of the negative weighting, >= 0 (1 / distance units).
        imbalance: weight of the negative part, in [0, 1].
        alpha: negative boundary (distance units), default 1 + margin / 2 (1.2 for margin 0.4,
            the paper's setting for unit-length embeddings).
        Tp: temperature of the positive weighting, >= 0 (0: plain mean, the paper).
        distance: default Euclidean; a similarity s enters as D = -s.
        reduction: "mean" over anchors, "nonzero_mean" or "sum".
        return_stats: also return a `StructuredStats` (terms: anchors with a pair).

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> ranked_list_loss(torch.nn.functional.normalize(x), y) >= 0
        tensor(True)
    """
    alpha = 1 + margin / 2 if alpha is None else alpha
    ids = (query_ids, ref_ids, relevance)
    inputs, pairs, sweep = setup_pairs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, distance, ids=ids
    )
    counts = new_counts(inputs)
    pos_boundary = alpha - margin

    def objective(block: Tensor, rows: slice) -> Tensor:
        dis = distance.as_dissimilarity(block)
        positives = pairs.positive_rows(rows)
        negatives = pairs.negative_mask(rows)
        pos_excess = dis.gather(1, positives.index) - pos_boundary
        violating = positives.valid & (pos_excess > 0)
        with torch.no_grad():
            pos_weights = masked_softmax(Tp * pos_excess, violating)
        neg_shortfall = alpha - dis
        neg_violating = negatives & (neg_shortfall > 0)
        with torch.no_grad():
            neg_weights = masked_softmax(Tn * neg_shortfall, neg_violating)
        pos_part = (pos_weights * pos_excess).sum(dim=1)
        neg_part = (neg_weights * neg_shortfall).sum(dim=1)
        terms = (1 - imbalance) * pos_part + imbalance * neg_part
        count_terms(counts, terms, (positives.count > 0) | negatives.any(dim=1))
        return terms.sum()

    total = sweep.run(objective)
    return finish_sum(inputs, sweep, total, counts, reduction, return_stats)


class RankedListLoss(MetricLoss):
    """Ranked list loss module; see `ranked_list_loss` for the formula and arguments.

    `alpha=None` (the default) means 1 + margin / 2 at each call.

    Example:
        >>> loss_fn = RankedListLoss(margin=0.4, Tn=10)
        >>> x = torch.nn.functional.normalize(torch.randn(8, 4))
        >>> loss = loss_fn(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(ranked_list_loss)
    local_anchor_supported = True


# ---------------------------------------------------------------------------------------------
# Margin loss


@checked(any_distance(EuclideanDistance), margin=check_non_negative, nu=check_non_negative)
def margin_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 0.2,
    beta: float | Tensor = 1.2,
    nu: float = 0.0,
    distance: BaseDistance | None = None,
    reduction: str = "nonzero_mean",
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, StructuredStats]:
    """Margin loss (Wu, Manmatha, Smola & Krähenbühl 2017, "Sampling matters").

        l(i, j) = [margin + y_ij (D_ij - beta(i))]+,  y_ij = +1 for positives, -1 for negatives

    over all positive and negative pairs (or the mined ones), plus nu * mean_i beta(i). beta(i)
    is the boundary of anchor i: one global value, or beta[labels[i]] with one value per class.
    Pass an `nn.Parameter` as `beta` to learn it (`MarginLoss(learn_beta=True)` does this).

    Args:
        margin: half-width of the band around beta, >= 0 (distance units).
        beta: the boundary, a float, a 0-dim tensor or a (num_classes,) tensor indexed by the
            anchor's label (distance units).
        nu: weight of the beta regulariser, >= 0.
        distance: default Euclidean; a similarity s enters as D = -s.
        reduction: "nonzero_mean" (default: the sum divided by the number of non-zero pair
            terms, as in the paper's code), "mean" over pairs or "sum". The regulariser is added
            after the reduction.
        return_stats: also return a `StructuredStats` (terms: pairs).

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> margin_loss(torch.nn.functional.normalize(x), y, beta=1.2) >= 0
        tensor(True)
    """
    ids = (query_ids, ref_ids, relevance)
    inputs = prepare_call(embeddings, labels, indices_tuple, ref_emb, ref_labels, ids)
    beta = torch.as_tensor(beta, device=inputs.embeddings.device)
    if not bool(torch.isfinite(beta).all()):
        raise ValueError(f"beta must be finite (distance units), got {beta.tolist()}")
    per_class = beta.dim() > 0
    if per_class:
        _check_beta_classes(beta, inputs.labels)
    pairs = PairSets(inputs)
    params = (beta,) if beta.requires_grad else ()
    sweep = Sweep(inputs.embeddings, inputs.ref_emb, inputs.ref_is_query, distance, params)
    counts = new_counts(inputs)
    dtype = inputs.embeddings.dtype

    def boundary(rows: slice) -> Tensor:
        value = beta.to(dtype)
        return value[inputs.labels[rows]].unsqueeze(1) if per_class else value

    def objective(block: Tensor, rows: slice) -> Tensor:
        dis = distance.as_dissimilarity(block)
        positives = pairs.positive_rows(rows)
        negatives = pairs.negative_mask(rows)
        edge = boundary(rows)
        pos_terms = F.relu(dis.gather(1, positives.index) - edge + margin) * positives.valid
        neg_terms = F.relu(edge - dis + margin) * negatives
        count_terms(counts, pos_terms, positives.valid)
        count_terms(counts, neg_terms, negatives)
        return pos_terms.sum() + neg_terms.sum()

    total = sweep.run(objective)
    regulariser = None
    if nu > 0:
        anchor_beta = beta.to(dtype)[inputs.labels] if per_class else beta.to(dtype)
        regulariser = nu * anchor_beta.mean()
    return finish_sum(inputs, sweep, total, counts, reduction, return_stats, regulariser)


def _check_beta_classes(beta: Tensor, labels: Tensor | None) -> None:
    if beta.dim() != 1:
        raise ValueError(f"beta must be a number or a 1-D (num_classes,) tensor, got {beta.shape}")
    if labels is None or labels.dim() != 1:
        raise ValueError(
            "a per-class beta needs labels of one class id per row (the anchor's class picks "
            "its beta); use a single beta with multi-hot labels or a relevance matrix"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(beta)):
        raise ValueError(
            f"labels must be in [0, num_classes) = [0, {len(beta)}) to index the per-class "
            f"beta, got labels in [{int(labels.min())}, {int(labels.max())}]; raise num_classes"
        )


class MarginLoss(MetricLoss):
    """Margin loss module with a global or per-class, optionally learnable, boundary beta.

    See `margin_loss` for the formula. With `learn_beta=True`, beta is an `nn.Parameter`
    (`loss_fn.beta`) of shape () or (num_classes,); give it its own learning rate with an
    optimizer parameter group, e.g. with `deepmetric.losses.param_groups.param_groups`:

        optimizer = torch.optim.SGD(param_groups(model, loss_fn, lr=1e-3, loss_lr=1e-2))

    which is the same as passing [{"params": model.parameters(), "lr": 1e-3},
    {"params": loss_fn.parameters(), "lr": 1e-2}].

    Args:
        margin, nu, distance, reduction: as in `margin_loss`.
        beta: initial boundary (distance units).
        learn_beta: make beta a learnable parameter (else a buffer).
        num_classes: one beta per class (labels must then lie in [0, num_classes)).

    Example:
        >>> loss_fn = MarginLoss(beta=1.2, learn_beta=True, num_classes=4)
        >>> x = torch.nn.functional.normalize(torch.randn(8, 4))
        >>> loss = loss_fn(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(margin_loss)

    @property
    def local_anchor_supported(self) -> bool:
        """True unless an extra term with a count of its own is added (see the reason)."""
        return self.nu == 0

    local_anchor_reason = (
        "its beta regulariser nu * mean(beta) is averaged over the anchors while the pair "
        "terms are averaged over the pairs (set nu=0 to run locally)"
    )

    def __init__(
        self,
        margin: float = 0.2,
        nu: float = 0.0,
        beta: float = 1.2,
        learn_beta: bool = False,
        num_classes: int | None = None,
        distance: BaseDistance | None = None,
        reduction: str = "nonzero_mean",
    ) -> None:
        super().__init__(distance, reduction)
        if num_classes is not None:
            check_count(num_classes, "num_classes")
        self.margin, self.nu, self.num_classes = margin, nu, num_classes
        shape = () if num_classes is None else (num_classes,)
        initial = torch.full(shape, check_finite(beta, "beta"))
        if learn_beta:
            self.beta = nn.Parameter(initial)
        else:
            self.register_buffer("beta", initial)

    def function_arguments(self) -> dict[str, object]:
        """The function's arguments, with the module's beta (a parameter or a buffer)."""
        return {**super().function_arguments(), "beta": self.beta}
