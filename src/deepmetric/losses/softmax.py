"""Softmax-classifier losses for metric learning (SPEC §5): normalised softmax with a
temperature, heated-up softmax, and the large-margin family (L-Softmax, SphereFace,
CosFace / AM-Softmax, ArcFace).

All are a cross-entropy over C class logits. With x^ = x / ||x||, w^_j = w_j / ||w_j|| and
cos(theta_j) = x^ . w^_j, the logit of the true class y is changed by a margin:

| loss | target logit | other logits | margin unit |
| --- | --- | --- | --- |
| normalised softmax | cos(theta_y) / sigma | cos(theta_j) / sigma | none |
| L-Softmax | ||w_y|| ||x|| psi(theta_y) | ||w_j|| ||x|| cos(theta_j) | integer multiplier m |
| SphereFace | ||x|| psi(theta_y) | ||x|| cos(theta_j) | integer multiplier m |
| CosFace | s (cos(theta_y) - m) | s cos(theta_j) | cosine units |
| ArcFace | s cos(theta_y + m) | s cos(theta_j) | radians |

psi(theta) = (-1)^k cos(m theta) - 2k for theta in [k pi / m, (k + 1) pi / m] is the
monotone extension of cos(m theta) (Liu et al. 2016). Every loss reduces to the plain
normalised softmax with m = 0 (m = 1 for the multiplicative margins), s = 1 and unit
inputs. Only the N target logits are changed, so each loss costs one (N, C) matmul plus a
cross-entropy. No acos is taken: cos(m theta) is a Chebyshev polynomial of cos(theta) and
cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m), with cos(theta) clamped to
[-1 + 1e-7, 1 - 1e-7] before the square root.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from deepmetric._validation import (
    HyperParameter,
    check_count,
    check_flag,
    check_non_negative,
    check_positive,
    check_range,
)
from deepmetric.distances import BaseDistance, DotProductSimilarity, safe_normalize
from deepmetric.losses.base import DistanceRule, checked
from deepmetric.losses.classifier import (
    COSINE,
    ClassBatch,
    ClassifierLoss,
    ClassifierStats,
    check_class_batch,
    cosine_logits,
    cross_entropy_terms,
    full_precision,
    init_class_vectors,
    reduce_rows,
    with_target,
)

COS_EPS = 1e-7
"""cos(theta) is clamped to [-1 + COS_EPS, 1 - COS_EPS] where sin(theta) is needed."""

DOT_PRODUCT = DistanceRule(
    DotProductSimilarity,
    lambda d: type(d) is DotProductSimilarity and not d.normalize_embeddings,
    "the plain dot product (its logits are ||w|| ||x|| psi(theta))",
)
check_cosine_margin = check_range(0, 1, "cosine units")
check_angle_margin = check_range(0, math.pi / 2, "radians")


@checked(COSINE, temperature=check_positive)
def normalized_softmax_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    weight: Tensor,
    temperature: float = 0.05,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, ClassifierStats]:
    """Normalised softmax with temperature (Zhai & Wu 2018; survey eq. 19).

        L = -log( exp(x^ . w^_y / sigma) / sum_j exp(x^ . w^_j / sigma) )

    with a bias-free classifier, L2-normalised features x^ and class weights w^_j. Survey
    eq. 14-17: this is Proxy-NCA with the positive in the denominator, proxies w_j, and
    squared distance scale 1 / (2 sigma).

    Args:
        embeddings: (N, D) features; labels: (N,) class indices in [0, C).
        weight: (C, D) class weights (proxies), keyword-only.
        temperature: sigma > 0 (dimensionless; logits are cosines / sigma). Zhai & Wu use
            0.05; too small or too large both hurt (survey table 1).
        distance: `CosineSimilarity()` (the default; no other).
        reduction: "mean", "nonzero_mean" or "sum" over samples.
        return_stats: also return a `ClassifierStats`.

    Example:
        >>> x, y, w = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(3, 4)
        >>> normalized_softmax_loss(x, y, weight=w, temperature=0.1).shape
        torch.Size([])
    """
    batch = check_class_batch(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, len(weight), weight=weight
    )
    with full_precision(embeddings.device):
        unit_w = safe_normalize(batch.cast(weight))
        logits = (safe_normalize(batch.embeddings) / temperature) @ unit_w.T
        terms = cross_entropy_terms(logits, batch.labels)
    return reduce_rows(terms, batch.dtype, reduction, return_stats)


def _chebyshev_psi(cos: Tensor, margin: int) -> Tensor:
    """psi(theta) = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi), from cos(theta)."""
    cos = cos.clamp(-1, 1)
    previous, current = torch.ones_like(cos), cos
    for _ in range(margin - 1):
        previous, current = current, 2 * cos * current - previous
    with torch.no_grad():
        k = torch.zeros_like(cos)
        for j in range(1, margin):
            k += (cos <= math.cos(j * math.pi / margin)).to(cos.dtype)
    return (1 - 2 * (k % 2)) * current - 2 * k


@checked(
    DOT_PRODUCT,
    margin=check_count,
    scale=check_positive,
    normalize_weights=check_flag,
    lambda_=check_non_negative,
)
def large_margin_softmax_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    weight: Tensor,
    margin: int = 4,
    scale: float = 1.0,
    normalize_weights: bool = False,
    lambda_: float = 0.0,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, ClassifierStats]:
    """Large-margin softmax, L-Softmax (Liu et al. 2016), and A-Softmax / SphereFace (Liu et
    al. 2017) with `normalize_weights=True`.

        f_j = s ||w_j|| ||x|| cos(theta_j)                      (j != y)
        f_y = s ||w_y|| ||x|| (lambda cos(theta_y) + psi(theta_y)) / (1 + lambda)
        L = cross_entropy(f, y)

    psi(theta) = (-1)^k cos(m theta) - 2k on [k pi / m, (k + 1) pi / m]. lambda blends the
    plain logit back in, the annealing trick of the original code (lambda large early, small
    late); lambda = 0 is the pure margin. Features are not normalised: their norm is part
    of the logit, as in both papers.

    Args:
        weight: (C, D) class weights, bias-free, keyword-only.
        margin: m, an integer >= 1 multiplying the angle to the true class (dimensionless;
            m = 1 is plain softmax).
        scale: s > 0, multiplies all logits (1 in the papers).
        normalize_weights: use w / ||w|| (SphereFace) instead of w (L-Softmax).
        lambda_: lambda >= 0.
        distance: `DotProductSimilarity()` (the default; no other).
        reduction: "mean", "nonzero_mean" or "sum" over samples.
        return_stats: also return a `ClassifierStats`.

    Example:
        >>> x, y, w = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(3, 4)
        >>> large_margin_softmax_loss(x, y, weight=w, margin=2) > 0
        tensor(True)
    """
    batch = check_class_batch(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, len(weight), weight=weight
    )
    with full_precision(embeddings.device):
        x, labels = batch.embeddings, batch.labels
        w = batch.cast(weight)
        if normalize_weights:
            w = safe_normalize(w)
        logits = (x * scale) @ w.T
        w_target = w[labels]
        plain = (x * w_target).sum(dim=1)
        norms = x.norm(dim=1) * w_target.norm(dim=1)
        cos = plain / norms.clamp_min(torch.finfo(x.dtype).tiny)
        target = (lambda_ * plain + norms * _chebyshev_psi(cos, margin)) / (1 + lambda_)
        terms = cross_entropy_terms(with_target(logits, labels, scale * target), labels)
    return reduce_rows(terms, batch.dtype, reduction, return_stats)


@checked(COSINE, margin=check_cosine_margin, scale=check_positive)
def cosface_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    weight: Tensor,
    margin: float = 0.35,
    scale: float = 64.0,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, ClassifierStats]:
    """Large-margin cosine loss, CosFace / AM-Softmax (Wang et al. 2018; seed 000).

        L = -log( e^{s (cos(theta_y) - m)}
                  / (e^{s (cos(theta_y) - m)} + sum_{j != y} e^{s cos(theta_j)}) )
          = log(1 + sum_{j != y} exp(s (cos(theta_j) + m - cos(theta_y))))

    the closing formula of seed 000; `additive_margin_loss` with `CosineSimilarity()` is the
    same loss.

    Args:
        weight: (C, D) class weights, normalised inside, keyword-only.
        margin: m in [0, 1], in cosine units (subtracted from cos(theta_y)).
        scale: s > 0 (64 in the paper).
        distance: `CosineSimilarity()` (the default; no other).
        reduction: "mean", "nonzero_mean" or "sum" over samples.
        return_stats: also return a `ClassifierStats`.

    Example:
        >>> x, y, w = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(3, 4)
        >>> cosface_loss(x, y, weight=w, margin=0.35, scale=30.0) > 0
        tensor(True)
    """
    batch = check_class_batch(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, len(weight), weight=weight
    )
    with full_precision(embeddings.device):
        terms = _cosine_margin_terms(batch, weight, scale, lambda cos: cos - margin)
    return reduce_rows(terms, batch.dtype, reduction, return_stats)


@checked(COSINE, margin=check_angle_margin, scale=check_positive, easy_margin=check_flag)
def arcface_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    weight: Tensor,
    margin: float = 0.5,
    scale: float = 64.0,
    easy_margin: bool = False,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, ClassifierStats]:
    """Additive angular margin loss, ArcFace (Deng et al. 2019).

        f_y = s cos(theta_y + m),  f_j = s cos(theta_j) (j != y),  L = cross_entropy(f, y)

    cos(theta + m) stops decreasing once theta + m > pi, which would reward moving away
    from the class. As in the authors' code, for theta > pi - m the target logit becomes
    s (cos(theta_y) - m sin(m)) instead, which keeps it decreasing in theta. With
    `easy_margin=True` the margin is applied only where cos(theta_y) > 0 (theta < pi / 2),
    and f_y = s cos(theta_y) elsewhere.

    Args:
        weight: (C, D) class weights, normalised inside, keyword-only.
        margin: m in [0, pi / 2], in radians (pytorch-metric-learning takes degrees;
            its default 28.6 degrees is our 0.5).
        scale: s > 0 (64 in the paper).
        easy_margin: apply the margin only for theta_y < pi / 2.
        distance: `CosineSimilarity()` (the default; no other: the margin is an angle).
        reduction: "mean", "nonzero_mean" or "sum" over samples.
        return_stats: also return a `ClassifierStats`.

    Example:
        >>> x, y, w = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(3, 4)
        >>> arcface_loss(x, y, weight=w, margin=0.5, scale=30.0) > 0
        tensor(True)
    """
    batch = check_class_batch(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, len(weight), weight=weight
    )
    target = functools.partial(_arcface_target, margin=margin, easy_margin=easy_margin)
    with full_precision(embeddings.device):
        terms = _cosine_margin_terms(batch, weight, scale, target)
    return reduce_rows(terms, batch.dtype, reduction, return_stats)


def _arcface_target(cos: Tensor, margin: float, easy_margin: bool) -> Tensor:
    """cos(theta + m) from cos(theta) (no acos), with ArcFace's fallbacks where theta + m
    would pass pi (cos(theta) - m sin(m)) or, with `easy_margin`, where theta > pi / 2
    (cos(theta))."""
    cos = cos.clamp(-1 + COS_EPS, 1 - COS_EPS)
    sin = (1 - cos * cos).sqrt()
    shifted = cos * math.cos(margin) - sin * math.sin(margin)
    if easy_margin:
        return torch.where(cos > 0, shifted, cos)
    return torch.where(cos > math.cos(math.pi - margin), shifted, cos - margin * math.sin(margin))


def _cosine_margin_terms(
    batch: ClassBatch, weight: Tensor, scale: float, target: Callable[[Tensor], Tensor]
) -> Tensor:
    """Per-row cross-entropy over the logits s cos(x_i, w_j), with the true class's logit
    s target(cos(x_i, w_y)): the target logit is all that a cosine margin changes."""
    logits, cos = cosine_logits(batch.embeddings, batch.cast(weight), scale, batch.labels)
    return cross_entropy_terms(with_target(logits, batch.labels, scale * target(cos)), batch.labels)


class NormalizedSoftmaxLoss(ClassifierLoss):
    """Normalised softmax with temperature (Zhai & Wu 2018); see `normalized_softmax_loss`.

    Holds the class weights `weight` (C, D), a float32 parameter.

    Args:
        num_classes: C; embedding_size: D.
        temperature: sigma > 0 (default 0.05, as in the paper and pytorch-metric-learning).
        distance: `CosineSimilarity()` (the default; no other).
        reduction: "mean", "nonzero_mean" or "sum".

    Example:
        >>> loss_fn = NormalizedSoftmaxLoss(num_classes=3, embedding_size=4)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
        >>> loss_fn.stats.num_terms
        8
    """

    function = staticmethod(normalized_softmax_loss)
    class_vectors = ("weight",)


class _CountsSteps:
    """Mixin: a step counter kept in the module's state_dict (as extra state)."""

    num_steps: int = 0

    def get_extra_state(self) -> dict:
        return {"num_steps": self.num_steps}

    def set_extra_state(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])


class HeatedUpSoftmaxLoss(_CountsSteps, NormalizedSoftmaxLoss):
    """Heated-up softmax (Zhang et al. 2018; survey eq. 20-23): normalised softmax whose
    scale alpha = 1 / T follows a schedule over training.

        L = -log softmax(alpha(t) x^ . w^)_y,
        alpha(t) = initial_scale for t < heat_up_at, then linearly to final_scale over
        ramp_steps steps, then final_scale.

    The paper "heats up": it trains with a large alpha (low temperature), which gives hard
    samples large gradients, then lowers alpha (raises the temperature) so the features of
    correctly classified boundary samples are pulled in too. `initial_scale > final_scale`
    does that; `initial_scale < final_scale` raises the scale instead (cooling down).
    Call `step()` once per step of whatever unit `heat_up_at` counts (iterations or
    epochs); the count is saved in the state_dict. `scale` and `temperature` (= 1 / scale)
    are read from the schedule at the current step.

    Args:
        num_classes: C; embedding_size: D.
        heat_up_at: the step at which the scale starts to change, >= 0.
        initial_scale: alpha before `heat_up_at`, > 0 (dimensionless; logits are
            alpha cos(theta)). Default 16.
        final_scale: alpha after the change, > 0. Default 4.
        ramp_steps: steps over which alpha moves linearly; 0 switches at once.
        distance: `CosineSimilarity()` (the default; no other).
        reduction: "mean", "nonzero_mean" or "sum".

    Example:
        >>> loss_fn = HeatedUpSoftmaxLoss(3, 4, heat_up_at=2)
        >>> for _ in range(3):
        ...     loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
        ...     scale = loss_fn.step()
        >>> loss_fn.scale, loss_fn.temperature
        (4.0, 0.25)
    """

    heat_up_at = HyperParameter(lambda value, name: check_count(value, name, minimum=0))
    initial_scale = HyperParameter(check_positive)
    final_scale = HyperParameter(check_positive)
    ramp_steps = HyperParameter(lambda value, name: check_count(value, name, minimum=0))

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        heat_up_at: int,
        initial_scale: float = 16.0,
        final_scale: float = 4.0,
        ramp_steps: int = 0,
        distance: BaseDistance | None = None,
        reduction: str = "mean",
    ) -> None:
        ClassifierLoss.__init__(self, num_classes, embedding_size, distance, reduction)
        self.heat_up_at, self.ramp_steps = heat_up_at, ramp_steps
        self.initial_scale, self.final_scale = initial_scale, final_scale
        self.weight = init_class_vectors(num_classes, embedding_size)
        self.num_steps = 0

    @property
    def scale(self) -> float:
        """alpha at the current step."""
        progress = (self.num_steps - self.heat_up_at + 1) / (self.ramp_steps + 1)
        progress = min(max(progress, 0.0), 1.0)
        return self.initial_scale + progress * (self.final_scale - self.initial_scale)

    @property
    def temperature(self) -> float:
        """1 / alpha at the current step (set the schedule, not this)."""
        return 1 / self.scale

    def step(self) -> float:
        """Advance the schedule by one step; return the new scale."""
        self.num_steps += 1
        return self.scale


@dataclass(frozen=True)
class LambdaSchedule:
    """The lambda annealing of the original L-Softmax / SphereFace code:

        lambda(t) = max(minimum, base (1 + gamma t)^(-power))

    for training iteration t. The defaults are SphereFace's published values (base 1000,
    gamma 0.12, power 1, minimum 5): the loss starts as nearly plain softmax and the margin
    takes over within a few thousand iterations.
    """

    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    minimum: float = 5.0

    def __post_init__(self) -> None:
        for name in ("base", "gamma", "power", "minimum"):
            check_non_negative(getattr(self, name), name)

    def __call__(self, iteration: int) -> float:
        return max(self.minimum, self.base * (1 + self.gamma * iteration) ** (-self.power))


def _check_schedule(value: object, name: str) -> LambdaSchedule | None:
    if value is not None and not isinstance(value, LambdaSchedule):
        raise TypeError(f"{name} must be a LambdaSchedule or None, got {type(value).__name__}")
    return value


class LargeMarginSoftmaxLoss(_CountsSteps, ClassifierLoss):
    """L-Softmax (Liu et al. 2016); see `large_margin_softmax_loss` for the formula.

    Holds the class weights `weight` (C, D). In training mode each call advances the lambda
    annealing by one iteration (`num_steps`, saved in the state_dict); `current_lambda` is
    the value the next call uses. `lambda_schedule=None` uses lambda = 0 (the pure margin).

    Args:
        num_classes: C; embedding_size: D.
        margin: integer angle multiplier m >= 1 (dimensionless; default 4, as in
            pytorch-metric-learning).
        scale: s > 0 multiplying all logits (default 1).
        normalize_weights: normalise the class weights (SphereFace).
        lambda_schedule: a `LambdaSchedule`, or None.
        distance: `DotProductSimilarity()` (the default; no other).
        reduction: "mean", "nonzero_mean" or "sum".

    Example:
        >>> loss_fn = LargeMarginSoftmaxLoss(num_classes=3, embedding_size=4, margin=2)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    """

    function = staticmethod(large_margin_softmax_loss)
    class_vectors = ("weight",)
    lambda_schedule = HyperParameter(_check_schedule)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: int = 4,
        scale: float = 1.0,
        normalize_weights: bool = False,
        lambda_schedule: LambdaSchedule | None = LambdaSchedule(),  # noqa: B008 (frozen)
        distance: BaseDistance | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, embedding_size, distance, reduction)
        self.margin, self.scale = margin, scale
        self.normalize_weights, self.lambda_schedule = normalize_weights, lambda_schedule
        self.weight = init_class_vectors(num_classes, embedding_size)
        self.num_steps = 0

    @property
    def current_lambda(self) -> float:
        """lambda for the next call (0 without a schedule)."""
        return 0.0 if self.lambda_schedule is None else self.lambda_schedule(self.num_steps)

    lambda_ = current_lambda  # the function's keyword, read from the schedule on each call

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        """Advance the lambda annealing by one iteration."""
        self.num_steps += 1


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """A-Softmax / SphereFace (Liu et al. 2017): L-Softmax with normalised class weights and
    SphereFace's lambda annealing; see `large_margin_softmax_loss`.

        f_y = s ||x|| (lambda cos(theta_y) + psi(theta_y)) / (1 + lambda)
        f_j = s ||x|| cos(theta_j)  (j != y)

    Args:
        num_classes: C; embedding_size: D.
        margin: integer angle multiplier m >= 1 (default 4, the paper's choice).
        scale: s > 0 (default 1).
        lambda_schedule: a `LambdaSchedule` (default: SphereFace's), or None.
        distance: `DotProductSimilarity()` (the default; no other).
        reduction: "mean", "nonzero_mean" or "sum".

    Example:
        >>> loss_fn = SphereFaceLoss(num_classes=3, embedding_size=4)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: int = 4,
        scale: float = 1.0,
        lambda_schedule: LambdaSchedule | None = LambdaSchedule(),  # noqa: B008 (frozen)
        distance: BaseDistance | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            num_classes, embedding_size, margin, scale, True, lambda_schedule, distance, reduction
        )


class CosFaceLoss(ClassifierLoss):
    """CosFace / AM-Softmax (Wang et al. 2018); see `cosface_loss` for the formula.

    Args:
        num_classes: C; embedding_size: D.
        margin: m in [0, 1], cosine units (default 0.35).
        scale: s > 0 (default 64).
        distance: `CosineSimilarity()` (the default; no other).
        reduction: "mean", "nonzero_mean" or "sum".

    Example:
        >>> loss_fn = CosFaceLoss(num_classes=3, embedding_size=4)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    """

    function = staticmethod(cosface_loss)
    class_vectors = ("weight",)


class ArcFaceLoss(ClassifierLoss):
    """ArcFace (Deng et al. 2019); see `arcface_loss` for the formula.

    Args:
        num_classes: C; embedding_size: D.
        margin: m in [0, pi / 2], radians (default 0.5; pytorch-metric-learning's 28.6 is in
            degrees).
        scale: s > 0 (default 64).
        easy_margin: apply the margin only where cos(theta_y) > 0.
        distance: `CosineSimilarity()` (the default; no other: the margin is an angle).
        reduction: "mean", "nonzero_mean" or "sum".

    Example:
        >>> loss_fn = ArcFaceLoss(num_classes=3, embedding_size=4, margin=0.5)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
        >>> loss_fn.stats.num_terms
        8
    """

    function = staticmethod(arcface_loss)
    class_vectors = ("weight",)
