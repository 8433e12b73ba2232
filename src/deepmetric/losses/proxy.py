"""Proxy and centre losses (SPEC §5): Proxy-NCA, Proxy-Anchor and the centre loss. The
additive margin over any distance and the adaptive margin (seed 000) are in
`deepmetric.losses.additive_margin`.

Every loss keeps learnable class vectors (proxies or centres) of shape (C, D) and costs one
(N, C) distance matrix plus O(N C) elementwise work; no loop runs over samples or classes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric._validation import (
    HyperParameter,
    check_choice,
    check_count,
    check_flag,
    check_non_negative,
    check_positive,
    check_range,
)
from deepmetric.distances import BaseDistance, SquaredEuclideanDistance
from deepmetric.losses.base import any_distance, checked
from deepmetric.losses.classifier import (
    COSINE,
    NOT_SIMILARITY,
    ClassifierLoss,
    ClassifierStats,
    check_class_batch,
    cosine_coefficient,
    cosine_logits,
    cross_entropy_terms,
    finish,
    full_precision,
    init_class_vectors,
    reduce_rows,
    sum_terms,
    very_negative,
)

ASSIGNMENTS = ("static", "dynamic")
check_assignment = functools.partial(check_choice, choices=ASSIGNMENTS)
check_cosine_margin = check_range(0, 1, "cosine units")
NCA_DISTANCES = any_distance(lambda: SquaredEuclideanDistance(normalize_embeddings=True))


def _logsumexp_middle(values: Tensor) -> Tensor:
    """logsumexp over dim 1 of (N, k, C) with a detached max (the shift cancels in the
    gradient); about twice as fast as torch.logsumexp over a middle dimension."""
    with torch.no_grad():
        top = values.amax(dim=1, keepdim=True)
    return (values - top).exp().sum(dim=1).log() + top.squeeze(1)


@checked(
    NCA_DISTANCES,
    softmax_scale=check_positive,
    proxies_per_class=check_count,
    assignment=check_assignment,
    exclude_positive=check_flag,
)
def proxy_nca_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    proxies: Tensor,
    softmax_scale: float = 1.0,
    proxies_per_class: int = 1,
    assignment: str = "static",
    exclude_positive: bool = True,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, ClassifierStats]:
    """Proxy-NCA (Movshovitz-Attias et al. 2017; survey eq. 12-14).

        L(x) = -log( exp(-s d(x, p(x))) / sum_{z in Z(x)} exp(-s d(x, z)) )

    with d the squared Euclidean distance of unit vectors by default (the paper's d^2 with
    normalised embeddings and proxies) and s = `softmax_scale` (1 in the paper).
    - `exclude_positive=True`: Z(x) = the proxies of the other classes (eq. 13, the paper).
      This loss has no lower bound: it keeps pushing negatives away.
    - `exclude_positive=False`: Z(x) also holds the positive (eq. 14), a softmax
      cross-entropy over -s d; with unit vectors it equals the normalised softmax with
      temperature 1 / (2 s) (eq. 15-17).
    Proxy assignment with `proxies_per_class` = k proxies per class (row j C + c is proxy j
    of class c, i.e. `proxies.view(k, C, D)`):
    - "static": the class's k proxies together are the positive, exp(-s d(x, p(x))) being
      the sum over them (k = 1: the paper's one proxy per class);
    - "dynamic": p(x) is the nearest proxy of x's class (eq. 12 restricted to the class).
    Proxies of x's class other than p(x) are in neither numerator nor denominator.
    With a single class there are no negatives and the loss is 0.

    Args:
        embeddings: (N, D); labels: (N,) class indices in [0, C).
        proxies: (k C, D) proxies, keyword-only.
        softmax_scale: s > 0, multiplies the distances (1 / temperature).
        proxies_per_class: k >= 1.
        assignment: "static" or "dynamic".
        exclude_positive: eq. 13 (True) or eq. 14 (False).
        distance: any `BaseDistance` (default squared Euclidean of normalised vectors);
            similarities are negated.
        reduction: "mean", "nonzero_mean" or "sum" over samples.
        return_stats: also return a `ClassifierStats`.

    Example:
        >>> x, y, p = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(3, 4)
        >>> proxy_nca_loss(x, y, proxies=p, exclude_positive=False) > 0
        tensor(True)
    """
    per_class = proxies_per_class
    if proxies.shape[0] % per_class:
        raise ValueError(
            f"proxies has {proxies.shape[0]} rows, not a multiple of proxies_per_class={per_class}"
        )
    num_classes = proxies.shape[0] // per_class
    batch = check_class_batch(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, num_classes, proxies=proxies
    )
    with full_precision(embeddings.device):
        logits, own_logits = _proxy_logits(
            batch, batch.cast(proxies), per_class, distance, softmax_scale
        )
        if num_classes == 1:  # no negatives: zero terms that keep the graph
            terms = logits.sum(dim=1) * 0
        else:
            terms = _nca_terms(
                logits, own_logits, batch.labels, per_class, assignment, exclude_positive
            )
    return reduce_rows(terms, batch.dtype, reduction, return_stats)


def _proxy_logits(batch, proxies: Tensor, per_class: int, distance: BaseDistance, scale: float):
    """-s d(x, p) for every proxy (N, k C), and for the k proxies of each sample's class
    (k, N); a cosine-type distance takes one matmul of unit vectors (up to a row constant)."""
    x, labels = batch.embeddings, batch.labels
    num_classes = len(proxies) // per_class
    own = labels + num_classes * torch.arange(per_class, device=x.device).unsqueeze(1)
    coefficient = cosine_coefficient(distance, scale)
    if coefficient is not None:
        logits, own_cos = cosine_logits(x, proxies, coefficient, own)
        return logits, coefficient * own_cos
    logits = distance.as_dissimilarity(distance(x, proxies)) * -scale
    pairs = distance.pairwise_distance(x.repeat(per_class, 1), proxies[own.flatten()])
    return logits, distance.as_dissimilarity(pairs).view_as(own) * -scale


def _nca_terms(logits, own_logits, labels, per_class: int, assignment: str, exclude: bool):
    """Eq. 13 (`exclude`) or eq. 14 per sample, from the logits of all proxies and of the
    sample's own (positive: log-sum-exp of the class's k logits for "static", their max for
    "dynamic")."""
    num_classes = logits.shape[1] // per_class
    if per_class == 1:
        class_scores = logits
    else:
        class_scores = _logsumexp_middle(logits.view(len(labels), per_class, num_classes))
    if assignment == "static" and not exclude:
        return cross_entropy_terms(class_scores, labels)
    if assignment == "dynamic":
        positive = own_logits.amax(dim=0)
    else:
        positive = own_logits.logsumexp(dim=0)
    column, fill = labels.unsqueeze(1), very_negative(logits.dtype)
    if per_class == 1:  # the matmul output: nothing saved it, so overwrite in place
        class_scores.scatter_(1, column, fill)
    else:
        class_scores = class_scores.scatter(1, column, fill)
    others = class_scores.logsumexp(dim=1)
    return others - positive if exclude else torch.logaddexp(positive, others) - positive


def _grouped_log1p_sum_exp(values: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """log(1 + sum_{i in group g} exp(values_i)) for every group g (0 for empty groups)."""
    with torch.no_grad():
        top = values.new_zeros(num_groups).scatter_reduce(0, groups, values, "amax")
    shifted = (values - top[groups]).exp()
    return top + torch.exp(-top).index_add(0, groups, shifted).log()


@dataclass(frozen=True)
class ProxyAnchorStats:
    """Proxy-Anchor's two parts, each a sum over proxies with its own normaliser:
    loss = positive.loss_sum / positive.normaliser + negative.loss_sum / negative.normaliser.
    `positive` counts the proxies with a positive in the batch, `negative` all proxies."""

    positive: ClassifierStats
    negative: ClassifierStats


@checked(COSINE, margin=check_cosine_margin, alpha=check_positive)
def proxy_anchor_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    proxies: Tensor,
    margin: float = 0.1,
    alpha: float = 32.0,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, ProxyAnchorStats]:
    """Proxy-Anchor loss (Kim et al. 2020).

        L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
          + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))

    s the cosine similarity, X_p+ / X_p- the batch samples of / not of p's class, P+ the
    proxies with at least one positive in the batch. Each proxy is an anchor that pulls its
    class's samples and pushes the others, weighted by their hardness.

    Args:
        embeddings: (N, D); labels: (N,) class indices in [0, C).
        proxies: (C, D) proxies (normalised inside), keyword-only.
        margin: delta in [0, 1], cosine units (default 0.1, as in the paper).
        alpha: > 0, the scale of the similarities (default 32; the paper's and
            pytorch-metric-learning's name).
        distance: `CosineSimilarity()` (the default; the only one the margin is defined for).
        reduction: "mean" (the paper's 1/|P+| and 1/|P|), "nonzero_mean" (over proxies with a
            non-zero term) or "sum", applied to each of the two sums.
        return_stats: also return a `ProxyAnchorStats`.

    Example:
        >>> x, y, p = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(3, 4)
        >>> proxy_anchor_loss(x, y, proxies=p) > 0
        tensor(True)
    """
    num_classes = proxies.shape[0]
    batch = check_class_batch(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, num_classes, proxies=proxies
    )
    labels = batch.labels
    with full_precision(embeddings.device):
        negative, cos_target = cosine_logits(batch.embeddings, batch.cast(proxies), alpha, labels)
        pos_terms = _grouped_log1p_sum_exp(-alpha * (cos_target - margin), labels, num_classes)
        has_positive = torch.bincount(labels, minlength=num_classes) > 0
        negative.scatter_(1, labels.unsqueeze(1), very_negative(negative.dtype))
        with torch.no_grad():  # the + alpha delta comes after the sum
            top = negative.amax(dim=0)
        column_lse = (negative - top).exp().sum(dim=0).log() + top
        neg_terms = F.softplus(column_lse + alpha * margin)
        stats = ProxyAnchorStats(
            sum_terms(pos_terms, reduction, has_positive), sum_terms(neg_terms, reduction)
        )
        loss = sum(part.loss_sum / part.normaliser for part in (stats.positive, stats.negative))
    loss = finish(loss, batch.dtype)
    return (loss, stats) if return_stats else loss


@checked(NOT_SIMILARITY, center_weight=check_non_negative)
def center_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    weight: Tensor,
    bias: Tensor | None = None,
    centers: Tensor,
    center_weight: float = 0.003,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, ClassifierStats]:
    """Softmax cross-entropy plus centre loss (Wen et al. 2016; survey eq. 7).

        L_i = -log softmax(W x_i + b)_{y_i} + (lambda / 2) d(x_i, c_{y_i})

    d the squared Euclidean distance ||x_i - c_{y_i}||^2 (the paper's, the default). The
    paper sums over the batch ("sum"); "mean" divides both parts by N. Gradients flow to
    `centers` only if it requires grad; the paper instead moves the centres with their own
    rule, `update_centers` (done by `CenterLoss` in training mode).

    Args:
        embeddings: (N, D); labels: (N,) class indices in [0, C).
        weight: (C, D) softmax weights; bias: (C,) or None; centers: (C, D) class centres
            (all keyword-only).
        center_weight: lambda >= 0, the weight of the centre term (default 0.003, the
            paper's face-recognition setting). Units: 1 / (distance units).
        distance: a distance for the centre term, not a similarity (default squared
            Euclidean).
        reduction: "mean", "nonzero_mean" or "sum" over samples.
        return_stats: also return a `ClassifierStats`.

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        >>> w, b, c = torch.randn(3, 4), torch.zeros(3), torch.zeros(3, 4)
        >>> center_loss(x, y, weight=w, bias=b, centers=c, center_weight=0.01) > 0
        tensor(True)
    """
    if centers.shape != weight.shape:
        raise ValueError(
            f"centers has shape {tuple(centers.shape)} but weight has {tuple(weight.shape)}; "
            "both are (num_classes, embedding_size)"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    vectors = {"weight": weight, "centers": centers}
    if bias is not None:
        vectors["bias"] = bias
    batch = check_class_batch(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, len(weight), **vectors
    )
    with full_precision(embeddings.device):
        x, labels = batch.embeddings, batch.labels
        logits = F.linear(x, batch.cast(weight), None if bias is None else batch.cast(bias))
        pulled = distance.pairwise_distance(x, batch.cast(centers)[labels])
        terms = cross_entropy_terms(logits, labels) + (center_weight / 2) * pulled
    return reduce_rows(terms, batch.dtype, reduction, return_stats)


@torch.no_grad()
def update_centers(centers: Tensor, embeddings: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """The centre update of Wen et al. 2016 (eq. 4), in place:

        delta_c_j = sum_i [y_i = j] (c_j - x_i) / (1 + sum_i [y_i = j])
        c_j <- c_j - alpha delta_c_j

    Centres of classes absent from the batch do not move. Returns `centers`.

    Args:
        centers: (C, D), updated in place.
        embeddings: (N, D); labels: (N,) class indices in [0, C) (any integer dtype).
        alpha: the centres' rate in (0, 1] (0.5 in the paper; the paper's name).
    """
    alpha = check_center_rate(alpha, "alpha")
    labels = labels.long()
    x = embeddings.detach().to(centers.dtype)
    counts = centers.new_zeros(len(centers)).index_add_(0, labels, centers.new_ones(len(x)))
    sums = torch.zeros_like(centers).index_add_(0, labels, x)
    delta = (counts.unsqueeze(1) * centers - sums) / (1 + counts.unsqueeze(1))
    return centers.sub_(alpha * delta)


def check_center_rate(value: object, name: str) -> float:
    """A centre update rate in (0, 1]."""
    value = check_range(0, 1, "a rate")(value, name)
    if value == 0:
        raise ValueError(f"{name} must be > 0 (or None to learn the centres by gradient)")
    return value


def _check_optional_rate(value: object, name: str) -> float | None:
    return None if value is None else check_center_rate(value, name)


class ProxyNCALoss(ClassifierLoss):
    """Proxy-NCA (Movshovitz-Attias et al. 2017); see `proxy_nca_loss` for the formula.

    Holds `proxies` (k C, D), a float32 parameter (the paper trains proxies with a larger
    learning rate; see `param_groups`).

    Args:
        num_classes: C; embedding_size: D.
        softmax_scale: s > 0 (default 1, as in the paper and pytorch-metric-learning).
        proxies_per_class: k >= 1.
        assignment: "static" or "dynamic" (nearest proxy of the class).
        exclude_positive: eq. 13 (default, the paper) or eq. 14 (pytorch-metric-learning).
        distance: default squared Euclidean of normalised vectors.
        reduction: "mean", "nonzero_mean" or "sum".

    Example:
        >>> loss_fn = ProxyNCALoss(num_classes=3, embedding_size=4)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
        >>> int(loss_fn.stats.num_terms)
        8
    """

    function = staticmethod(proxy_nca_loss)
    class_vectors = ("proxies",)

    def class_vector_rows(self) -> int:
        """k C proxies: row j C + c is proxy j of class c."""
        return self.num_classes * self.proxies_per_class


class ProxyAnchorLoss(ClassifierLoss):
    """Proxy-Anchor (Kim et al. 2020); see `proxy_anchor_loss` for the formula.

    Holds `proxies` (C, D), a float32 parameter. The paper trains the proxies with a learning
    rate 100 times the network's; see `param_groups`. `stats` is a `ProxyAnchorStats`.

    Args:
        num_classes: C; embedding_size: D.
        margin: delta in [0, 1], cosine units (default 0.1).
        alpha: > 0, the scale (default 32).
        distance: `CosineSimilarity()` (default; no other).
        reduction: "mean", "nonzero_mean" or "sum".

    Example:
        >>> loss_fn = ProxyAnchorLoss(num_classes=3, embedding_size=4)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    """

    function = staticmethod(proxy_anchor_loss)
    class_vectors = ("proxies",)
    local_anchor_supported = False
    local_anchor_reason = (
        "each proxy's two terms are log-sum-exps over all samples of the batch, so one "
        "rank's rows do not give a share of the loss that sums over ranks"
    )


class CenterLoss(ClassifierLoss):
    """Softmax plus centre loss (Wen et al. 2016); see `center_loss` for the formula.

    Holds the softmax classifier `weight` (C, D) and `bias` (C,) as parameters, and the
    class centres `centers` (C, D). With `alpha` (default 0.5; the paper's name for the
    centres' rate) the centres follow the paper's own rule (`update_centers`): they are a
    buffer, not a parameter, moved on every training-mode call after the loss is computed
    (like BatchNorm's running statistics; call `.eval()` to compute the loss without moving
    them). With `alpha=None` they are a parameter learned by the optimizer through the centre
    term.

    Args:
        num_classes: C; embedding_size: D.
        center_weight: lambda >= 0 (default 0.003).
        alpha: the centres' rate in (0, 1], or None.
        bias: give the softmax classifier a bias (as in the paper).
        distance: the centre term's distance (default squared Euclidean, the paper's).
        reduction: "mean", "nonzero_mean" or "sum".

    Example:
        >>> loss_fn = CenterLoss(num_classes=3, embedding_size=4, center_weight=0.01)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    """

    function = staticmethod(center_loss)
    class_vectors = ("weight", "bias", "centers")
    alpha = HyperParameter(_check_optional_rate)
    local_anchor_reason = (
        "with alpha, the centres move by the paper's rule from the rows of the call, so each "
        "rank would move them by its own rows; use alpha=None (learned centres)"
    )

    @property
    def local_anchor_supported(self) -> bool:
        """Only with learned centres (alpha=None): moved centres would differ per rank."""
        return self.alpha is None

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        center_weight: float = 0.003,
        alpha: float | None = 0.5,
        bias: bool = True,
        distance: BaseDistance | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, embedding_size, distance, reduction)
        self.center_weight, self.alpha = center_weight, alpha
        self.weight = init_class_vectors(num_classes, embedding_size)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None
        centers = init_class_vectors(num_classes, embedding_size)
        if self.alpha is None:
            self.centers = centers
        else:
            self.register_buffer("centers", centers.detach().clone())

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        """Move the centres by the paper's rule (when `alpha` is set)."""
        if self.alpha is not None:
            update_centers(self.centers, embeddings, labels, self.alpha)
