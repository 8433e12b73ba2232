"""Proxy and centre losses (SPEC §5): Proxy-NCA, Proxy-Anchor and the centre loss. The
additive margin over any distance and the adaptive margin (seed 000) are in
`deepmetric.losses.additive_margin`.

Every loss keeps learnable class vectors (proxies or centres) of shape (C, D) and costs one
(N, C) distance matrix plus O(N C) elementwise work; no loop runs over samples or classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric._validation import check_choice
from deepmetric.distances import (
    BaseDistance,
    CosineSimilarity,
    EuclideanDistance,
    SquaredEuclideanDistance,
)
from deepmetric.losses.classifier import (
    ClassifierLoss,
    check_class_call,
    check_count,
    check_range,
    check_scale,
    cosine_coefficient,
    cross_entropy_terms,
    full_precision,
    init_class_vectors,
    reduce_rows,
    reject_mining_inputs,
    very_negative,
)
from deepmetric.losses.reduction import check_reduction, reduce_terms, zero_with_graph

ASSIGNMENTS = ("static", "dynamic")


def _default_proxy_distance() -> BaseDistance:
    return SquaredEuclideanDistance(normalize_embeddings=True)


def _logsumexp_middle(values: Tensor) -> Tensor:
    """logsumexp over dim 1 of (N, k, C) with a detached max (the shift cancels in the
    gradient); about twice as fast as torch.logsumexp over a middle dimension."""
    with torch.no_grad():
        top = values.amax(dim=1, keepdim=True)
    return (values - top).exp().sum(dim=1).log() + top.squeeze(1)


def proxy_nca_loss(
    embeddings: Tensor,
    labels: Tensor,
    proxies: Tensor,
    *,
    softmax_scale: float = 1.0,
    proxies_per_class: int = 1,
    assignment: str = "static",
    exclude_positive: bool = True,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
) -> Tensor:
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
        proxies: (k C, D) proxies.
        softmax_scale: s > 0, multiplies the distances (1 / temperature).
        proxies_per_class: k >= 1.
        assignment: "static" or "dynamic".
        exclude_positive: eq. 13 (True) or eq. 14 (False).
        distance: any `BaseDistance` (default squared Euclidean of normalised vectors);
            similarities are negated.
        reduction: "mean", "nonzero_mean" or "sum" over samples.

    Example:
        >>> x, y, p = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(3, 4)
        >>> proxy_nca_loss(x, y, p, exclude_positive=False) > 0
        tensor(True)
    """
    distance = _default_proxy_distance() if distance is None else distance
    check_reduction(reduction)
    scale = check_scale(softmax_scale, "softmax_scale")
    per_class = check_count(proxies_per_class, "proxies_per_class")
    check_choice(assignment, "assignment", ASSIGNMENTS)
    if proxies.shape[0] % per_class:
        raise ValueError(
            f"proxies has {proxies.shape[0]} rows, not a multiple of proxies_per_class={per_class}"
        )
    num_classes = proxies.shape[0] // per_class
    inputs = check_class_call(embeddings, labels, num_classes, proxies.shape[1], proxies)
    with full_precision(embeddings.device):
        x = inputs.embeddings
        proxies = proxies.to(x.dtype)
        # own[j, i]: the row of proxy j of sample i's class
        own = labels + num_classes * torch.arange(per_class, device=x.device).unsqueeze(1)
        coefficient = cosine_coefficient(distance, scale)
        if coefficient is not None:
            unit_x, unit_p = F.normalize(x, dim=1), F.normalize(proxies, dim=1)
            logits = (unit_x * coefficient) @ unit_p.T
            own_logits = coefficient * (unit_x * unit_p[own]).sum(dim=2)
        else:
            logits = distance.as_dissimilarity(distance(x, proxies)) * -scale
            pairs = distance.pairwise_distance(x.repeat(per_class, 1), proxies[own.flatten()])
            own_logits = distance.as_dissimilarity(pairs).view_as(own) * -scale
        if num_classes == 1:
            return inputs.finish(zero_with_graph(logits))
        if per_class == 1:
            class_scores = logits
        else:
            class_scores = _logsumexp_middle(logits.view(len(x), per_class, num_classes))
        if assignment == "static" and not exclude_positive:
            terms = cross_entropy_terms(class_scores, labels)
        else:
            if assignment == "dynamic":
                positive = own_logits.amax(dim=0)
            else:
                positive = own_logits.logsumexp(dim=0)
            fill, column = very_negative(x.dtype), labels.unsqueeze(1)
            if per_class == 1:  # the matmul output: nothing saved it, so overwrite in place
                class_scores.scatter_(1, column, fill)
            else:
                class_scores = class_scores.scatter(1, column, fill)
            others = class_scores.logsumexp(dim=1)
            if exclude_positive:
                terms = others - positive
            else:
                terms = torch.logaddexp(positive, others) - positive
    return reduce_rows(terms, reduction, inputs)


def _grouped_log1p_sum_exp(values: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """log(1 + sum_{i in group g} exp(values_i)) for every group g (0 for empty groups)."""
    with torch.no_grad():
        top = values.new_zeros(num_groups).scatter_reduce(0, groups, values, "amax")
    shifted = (values - top[groups]).exp()
    return top + torch.exp(-top).index_add(0, groups, shifted).log()


def proxy_anchor_loss(
    embeddings: Tensor,
    labels: Tensor,
    proxies: Tensor,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
    reduction: str = "mean",
) -> Tensor:
    """Proxy-Anchor loss (Kim et al. 2020).

        L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
          + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))

    s the cosine similarity, X_p+ / X_p- the batch samples of / not of p's class, P+ the
    proxies with at least one positive in the batch. Each proxy is an anchor that pulls its
    class's samples and pushes the others, weighted by their hardness.

    Args:
        embeddings: (N, D); labels: (N,) class indices in [0, C).
        proxies: (C, D) proxies (normalised inside).
        margin: delta in [0, 1], cosine units (default 0.1, as in the paper).
        alpha: > 0, the scale (default 32).
        reduction: "mean" (the paper's 1/|P+| and 1/|P|), "nonzero_mean" (over proxies with a
            non-zero term) or "sum", applied to each of the two sums.

    Example:
        >>> x, y, p = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(3, 4)
        >>> proxy_anchor_loss(x, y, p) > 0
        tensor(True)
    """
    check_reduction(reduction)
    margin = check_range(margin, "margin", 0, 1, "cosine units")
    alpha = check_scale(alpha, "alpha")
    num_classes = proxies.shape[0]
    inputs = check_class_call(embeddings, labels, num_classes, proxies.shape[1], proxies)
    with full_precision(embeddings.device):
        x = F.normalize(inputs.embeddings, dim=1)
        unit_proxies = F.normalize(proxies.to(x.dtype), dim=1)
        cos_target = (x * unit_proxies[labels]).sum(dim=1)
        pos_terms = _grouped_log1p_sum_exp(-alpha * (cos_target - margin), labels, num_classes)
        has_positive = torch.bincount(labels, minlength=num_classes) > 0
        negative = (x * alpha) @ unit_proxies.T  # the + alpha delta comes after the sum
        negative.scatter_(1, labels.unsqueeze(1), very_negative(x.dtype))
        with torch.no_grad():
            top = negative.amax(dim=0)
        column_lse = (negative - top).exp().sum(dim=0).log() + top
        neg_terms = F.softplus(column_lse + alpha * margin)
        loss = reduce_terms(pos_terms, reduction, has_positive) + reduce_terms(neg_terms, reduction)
    return inputs.finish(loss)


def center_loss(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    centers: Tensor,
    *,
    center_weight: float = 0.003,
    reduction: str = "mean",
) -> Tensor:
    """Softmax cross-entropy plus centre loss (Wen et al. 2016; survey eq. 7).

        L_i = -log softmax(W x_i + b)_{y_i} + (lambda / 2) ||x_i - c_{y_i}||^2

    The paper sums over the batch ("sum"); "mean" divides both parts by N. Gradients flow
    to `centers` only if it requires grad; the paper instead moves the centres with their
    own rule, `update_centers` (done by `CenterLoss` in training mode).

    Args:
        embeddings: (N, D); labels: (N,) class indices in [0, C).
        weight: (C, D) softmax weights; bias: (C,) or None.
        centers: (C, D) class centres.
        center_weight: lambda >= 0, the weight of the centre term (default 0.003, the
            paper's face-recognition setting). Units: 1 / (embedding units)^2.
        reduction: "mean", "nonzero_mean" or "sum" over samples.

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        >>> w, b, c = torch.randn(3, 4), torch.zeros(3), torch.zeros(3, 4)
        >>> center_loss(x, y, w, b, c, center_weight=0.01) > 0
        tensor(True)
    """
    check_reduction(reduction)
    if not center_weight >= 0:
        raise ValueError(f"center_weight must be >= 0, got {center_weight}")
    if centers.shape != weight.shape:
        raise ValueError(
            f"centers has shape {tuple(centers.shape)} but weight has {tuple(weight.shape)}; "
            "both are (num_classes, embedding_size)"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    extra = (centers,) if bias is None else (centers, bias)
    inputs = check_class_call(embeddings, labels, *weight.shape, weight, *extra)
    with full_precision(embeddings.device):
        x = inputs.embeddings
        logits = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        pulled = (x - centers.to(x.dtype)[labels]).pow(2).sum(dim=1)
        terms = cross_entropy_terms(logits, labels) + (center_weight / 2) * pulled
    return reduce_rows(terms, reduction, inputs)


@torch.no_grad()
def update_centers(centers: Tensor, embeddings: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """The centre update of Wen et al. 2016 (eq. 4), in place:

        delta_c_j = sum_i [y_i = j] (c_j - x_i) / (1 + sum_i [y_i = j])
        c_j <- c_j - alpha delta_c_j

    Centres of classes absent from the batch do not move. Returns `centers`.

    Args:
        centers: (C, D), updated in place.
        embeddings: (N, D); labels: (N,) class indices in [0, C).
        alpha: the centres' rate in (0, 1] (0.5 in the paper).
    """
    alpha = check_range(alpha, "alpha", 0, 1, "a rate")
    x = embeddings.detach().to(centers.dtype)
    counts = centers.new_zeros(len(centers)).index_add_(0, labels, centers.new_ones(len(x)))
    sums = torch.zeros_like(centers).index_add_(0, labels, x)
    delta = (counts.unsqueeze(1) * centers - sums) / (1 + counts.unsqueeze(1))
    return centers.sub_(alpha * delta)


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
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        softmax_scale: float = 1.0,
        proxies_per_class: int = 1,
        assignment: str = "static",
        exclude_positive: bool = True,
        distance: BaseDistance | None = None,
        reduction: str = "mean",
    ) -> None:
        distance = _default_proxy_distance() if distance is None else distance
        super().__init__(num_classes, embedding_size, distance, reduction)
        self.softmax_scale = check_scale(softmax_scale, "softmax_scale")
        self.proxies_per_class = check_count(proxies_per_class, "proxies_per_class")
        self.assignment = check_choice(assignment, "assignment", ASSIGNMENTS)
        self.exclude_positive = exclude_positive
        self.proxies = init_class_vectors(num_classes * proxies_per_class, embedding_size)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        reject_mining_inputs(indices_tuple, ref_emb, ref_labels)
        return proxy_nca_loss(
            embeddings,
            labels,
            self.proxies,
            softmax_scale=self.softmax_scale,
            proxies_per_class=self.proxies_per_class,
            assignment=self.assignment,
            exclude_positive=self.exclude_positive,
            distance=self.distance,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, softmax_scale={self.softmax_scale}, "
            f"proxies_per_class={self.proxies_per_class}, assignment={self.assignment!r}, "
            f"exclude_positive={self.exclude_positive}"
        )


class ProxyAnchorLoss(ClassifierLoss):
    """Proxy-Anchor (Kim et al. 2020); see `proxy_anchor_loss` for the formula.

    Holds `proxies` (C, D), a float32 parameter. The paper trains the proxies with a learning
    rate 100 times the network's; see `param_groups`.

    Args:
        num_classes: C; embedding_size: D.
        margin: delta in [0, 1], cosine units (default 0.1).
        alpha: > 0 (default 32).
        reduction: "mean", "nonzero_mean" or "sum".

    Example:
        >>> loss_fn = ProxyAnchorLoss(num_classes=3, embedding_size=4)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, embedding_size, CosineSimilarity(), reduction)
        self.margin = check_range(margin, "margin", 0, 1, "cosine units")
        self.alpha = check_scale(alpha, "alpha")
        self.proxies = init_class_vectors(num_classes, embedding_size)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        reject_mining_inputs(indices_tuple, ref_emb, ref_labels)
        return proxy_anchor_loss(
            embeddings,
            labels,
            self.proxies,
            margin=self.margin,
            alpha=self.alpha,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, alpha={self.alpha}"


class CenterLoss(ClassifierLoss):
    """Softmax plus centre loss (Wen et al. 2016); see `center_loss` for the formula.

    Holds the softmax classifier `weight` (C, D) and `bias` (C,) as parameters, and the
    class centres `centers` (C, D). With `alpha` (default 0.5) the centres follow the
    paper's own rule (`update_centers`): they are a buffer, not a parameter, moved on every
    training-mode call after the loss is computed (like BatchNorm's running statistics;
    call `.eval()` to compute the loss without moving them). With `alpha=None` they are a
    parameter learned by the optimizer through the centre term.

    Args:
        num_classes: C; embedding_size: D.
        center_weight: lambda >= 0 (default 0.003).
        alpha: the centres' rate in (0, 1], or None.
        bias: give the softmax classifier a bias (as in the paper).
        reduction: "mean", "nonzero_mean" or "sum".

    Example:
        >>> loss_fn = CenterLoss(num_classes=3, embedding_size=4, center_weight=0.01)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        center_weight: float = 0.003,
        alpha: float | None = 0.5,
        bias: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, embedding_size, EuclideanDistance(), reduction)
        if not center_weight >= 0:
            raise ValueError(f"center_weight must be >= 0, got {center_weight}")
        self.center_weight = float(center_weight)
        self.alpha = None if alpha is None else check_range(alpha, "alpha", 0, 1, "a rate")
        if self.alpha is not None and self.alpha == 0:
            raise ValueError("alpha must be > 0 (or None to learn the centres by gradient)")
        self.weight = init_class_vectors(num_classes, embedding_size)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None
        centers = init_class_vectors(num_classes, embedding_size)
        if self.alpha is None:
            self.centers = centers
        else:
            self.register_buffer("centers", centers.detach().clone())

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        reject_mining_inputs(indices_tuple, ref_emb, ref_labels)
        loss = center_loss(
            embeddings,
            labels,
            self.weight,
            self.bias,
            self.centers,
            center_weight=self.center_weight,
            reduction=self.reduction,
        )
        if self.training and self.alpha is not None:
            update_centers(self.centers, embeddings, labels, self.alpha)
        return loss

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, center_weight={self.center_weight}, alpha={self.alpha}, "
            f"bias={self.bias is not None}"
        )
