"""Additive-margin cross-entropy over any distance and the adaptive margin (seed 000; SPEC §5).

Seed 000 asks each sample to be nearer its own class centre than any other centre by a
margin m, and shows with the triangle inequality that m should be the mean class diameter:
`additive_margin_loss` / `AdditiveMarginLoss` implement the loss, `AdaptiveMargin` the
"start at 0, measure, set m, measure again" schedule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deepmetric._validation import HyperParameter, check_count, check_non_negative, check_positive
from deepmetric.distances import BaseDistance, EuclideanDistance
from deepmetric.losses.base import any_distance, checked
from deepmetric.losses.classifier import (
    NOT_SIMILARITY,
    ClassifierLoss,
    ClassifierStats,
    check_class_batch,
    cosine_coefficient,
    cosine_logits,
    cross_entropy_terms,
    full_precision,
    reduce_rows,
    with_target,
)

logger = logging.getLogger(__name__)

ADDITIVE_DISTANCES = any_distance(EuclideanDistance)


@dataclass(frozen=True)
class AdditiveMarginStats(ClassifierStats):
    """`ClassifierStats` plus d(z, c_y) per sample (detached, in the distance's units; for a
    similarity, the similarity) and the margin used."""

    center_distance: Tensor
    margin: float


@checked(ADDITIVE_DISTANCES, margin=check_non_negative, scale=check_positive)
def additive_margin_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    centers: Tensor,
    margin: float = 0.0,
    scale: float = 1.0,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, AdditiveMarginStats]:
    """Additive-margin cross-entropy over any distance (seed 000, eq. 5).

        L(z) = log(1 + sum_{i != y} exp(s (d(z, c_y) + m - d(z, c_i))))

    asks each sample to be nearer its own centre than any other centre by m. By the
    triangle inequality, with m the mean class diameter this makes nearest-centre
    classification imply correct nearest-neighbour ranking (seed 000). With a similarity
    the differences turn around: CosineSimilarity gives AM-Softmax / CosFace,
    log(1 + sum_{i != y} exp(s (cos(z, c_i) + m - cos(z, c_y)))). It equals the softmax
    cross-entropy of the logits -s d(z, c_i), with m added to the true class's distance.

    Args:
        embeddings: (N, D); labels: (N,) class indices in [0, C).
        centers: (C, D) class centres c_i, keyword-only.
        margin: m >= 0, in the distance's units.
        scale: s > 0, in 1 / distance units.
        distance: any `BaseDistance` (default Euclidean); seed 000 asks for a metric, e.g.
            Euclidean or `MetricCosineDistance`.
        reduction: "mean", "nonzero_mean" or "sum" over samples.
        return_stats: also return an `AdditiveMarginStats`.

    Example:
        >>> x, y, c = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(3, 4)
        >>> additive_margin_loss(x, y, centers=c, margin=0.5, scale=4.0) > 0
        tensor(True)
    """
    batch = check_class_batch(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, len(centers), centers=centers
    )
    with full_precision(embeddings.device):
        x, labels, centers = batch.embeddings, batch.labels, batch.cast(centers)
        coefficient = cosine_coefficient(distance, scale)
        if coefficient is not None:  # logits -s d(z, c_i) up to a per-row constant
            logits, own = cosine_logits(x, centers, coefficient, labels)
            target = coefficient * own - scale * margin
        else:
            dissimilarity = distance.as_dissimilarity(distance(x, centers))
            logits = dissimilarity * -scale
            target = (dissimilarity.gather(1, labels.unsqueeze(1)) + margin) * -scale
        terms = cross_entropy_terms(with_target(logits, labels, target), labels)
        loss, stats = reduce_rows(terms, batch.dtype, reduction, True)
    if not return_stats:
        return loss
    with torch.no_grad():
        own_distance = distance.pairwise_distance(x, centers[labels])
    return loss, AdditiveMarginStats(**vars(stats), center_distance=own_distance, margin=margin)


@dataclass(frozen=True)
class MarginEstimate:
    """One re-estimation of the adaptive margin: at `step`, the mean distance of
    `num_samples` samples to their class centre, and the margin set from it."""

    step: int
    mean_center_distance: float
    margin: float
    num_samples: int


class AdaptiveMargin:
    """The adaptive margin of seed 000: start with m = 0, train, measure the mean class
    diameter, use it as m, and re-measure as training goes on.

        m = diameter_factor * mean_i d(z_i, c_{y_i})

    over the samples observed since the last estimate. Seed 000's margin is
    d(z3, c1) + d(z2, c2), two class radii, hence diameter_factor = 2. Every estimate is
    logged (logger `deepmetric.losses.additive_margin`, level INFO) and kept in `history`.

    `AdditiveMarginLoss(margin=AdaptiveMargin(...))` calls `observe` and `step` itself on
    every training-mode call; a trainer can also call them directly.

    Args:
        update_every: re-estimate m every this many `step()` calls (>= 1).
        diameter_factor: > 0, how many radii make the margin (default 2).
        initial_margin: m before the first estimate (>= 0; 0 in seed 000).
        max_margin: optional upper bound on m.

    Example:
        >>> schedule = AdaptiveMargin(update_every=2)
        >>> for _ in range(2):
        ...     schedule.observe(torch.tensor([0.2, 0.4]))
        ...     estimate = schedule.step()
        >>> round(schedule.margin, 6)
        0.6
    """

    def __init__(
        self,
        update_every: int = 100,
        diameter_factor: float = 2.0,
        initial_margin: float = 0.0,
        max_margin: float | None = None,
    ) -> None:
        self.update_every = check_count(update_every, "update_every")
        self.diameter_factor = check_positive(diameter_factor, "diameter_factor")
        initial_margin = check_non_negative(initial_margin, "initial_margin")
        if max_margin is not None:
            max_margin = check_non_negative(max_margin, "max_margin")
        self.max_margin = max_margin
        self.margin = initial_margin
        self.num_steps = 0
        self.history: list[MarginEstimate] = []
        self._sum: Tensor | float = 0.0
        self._count = 0

    def observe(self, center_distances: Tensor) -> None:
        """Add samples' distances to their own class centre (any shape; detached). No host
        synchronisation: the sum stays on the device until the next estimate."""
        values = center_distances.detach()
        self._sum = self._sum + values.sum(dtype=torch.float64)
        self._count += values.numel()

    def step(self) -> MarginEstimate | None:
        """Count one step; every `update_every` steps set m from the observed distances and
        return the new `MarginEstimate` (None otherwise, or when nothing was observed)."""
        self.num_steps += 1
        if self.num_steps % self.update_every or self._count == 0:
            return None
        mean = float(self._sum) / self._count
        margin = max(self.diameter_factor * mean, 0.0)
        if self.max_margin is not None:
            margin = min(margin, self.max_margin)
        estimate = MarginEstimate(self.num_steps, mean, margin, self._count)
        self.margin = margin
        self.history.append(estimate)
        self._sum, self._count = 0.0, 0
        logger.info(
            "adaptive margin at step %d: mean distance to class centre %.6g over %d samples "
            "-> margin %.6g",
            estimate.step,
            estimate.mean_center_distance,
            estimate.num_samples,
            estimate.margin,
        )
        return estimate

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the schedule."""
        return {
            "margin": self.margin,
            "num_steps": self.num_steps,
            "history": [vars(e) for e in self.history],
            "sum": float(self._sum),
            "count": self._count,
        }

    def load_state_dict(self, state: dict) -> None:
        self.margin, self.num_steps = float(state["margin"]), int(state["num_steps"])
        self.history = [MarginEstimate(**e) for e in state["history"]]
        self._sum, self._count = float(state["sum"]), int(state["count"])

    def __repr__(self) -> str:
        return (
            f"AdaptiveMargin(margin={self.margin:.6g}, update_every={self.update_every}, "
            f"diameter_factor={self.diameter_factor})"
        )


class _Margin(HyperParameter):
    """`AdditiveMarginLoss.margin`: a number >= 0 (distance units) or an `AdaptiveMargin`,
    which measures class diameters and so needs the loss's distance to be a distance."""

    def __set__(self, instance: object, value: Any) -> None:
        if isinstance(value, AdaptiveMargin) and not NOT_SIMILARITY.accepts(instance.distance):
            raise ValueError(
                "an AdaptiveMargin measures class diameters, which needs a distance, not a "
                f"similarity ({type(instance.distance).__name__}); use e.g. EuclideanDistance "
                "or MetricCosineDistance"
            )
        super().__set__(instance, value)


def _check_margin(value: object, name: str) -> float | AdaptiveMargin:
    return value if isinstance(value, AdaptiveMargin) else check_non_negative(value, name)


class AdditiveMarginLoss(ClassifierLoss):
    """Additive-margin cross-entropy over any distance with learnable class centres (seed
    000); see `additive_margin_loss` for the formula.

    Holds `centers` (C, D), a float32 parameter. `margin` is a number (distance units) or an
    `AdaptiveMargin`, whose current m is used and which, in training mode, is fed each
    batch's distances to the class centres and stepped once per call. `stats` holds the
    `AdditiveMarginStats` of the last call.

    Args:
        num_classes: C; embedding_size: D.
        margin: m >= 0 or an `AdaptiveMargin` (which needs a distance, not a similarity).
        scale: s > 0, in 1 / distance units (default 1).
        distance: any `BaseDistance` (default Euclidean).
        reduction: "mean", "nonzero_mean" or "sum".

    Example:
        >>> loss_fn = AdditiveMarginLoss(3, 4, margin=AdaptiveMargin(update_every=10))
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
        >>> loss_fn.margin.margin
        0.0
    """

    function = staticmethod(additive_margin_loss)
    class_vectors = ("centers",)
    margin: float | AdaptiveMargin = _Margin(_check_margin)  # the constructor's annotation
    local_anchor_reason = (
        "an AdaptiveMargin is estimated from the distances of the rows of the call, so each "
        "rank would estimate its own margin; use a fixed margin"
    )

    @property
    def local_anchor_supported(self) -> bool:
        """Only with a fixed margin: adaptive margins would differ per rank."""
        return not isinstance(self.margin, AdaptiveMargin)

    @property
    def current_margin(self) -> float:
        """The margin the next call uses."""
        adaptive = isinstance(self.margin, AdaptiveMargin)
        return self.margin.margin if adaptive else self.margin

    def function_arguments(self) -> dict:
        return {**super().function_arguments(), "margin": self.current_margin}

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        """Feed an `AdaptiveMargin` this batch's distances to the class centres; step it."""
        if isinstance(self.margin, AdaptiveMargin):
            self.margin.observe(self.stats.center_distance)
            self.margin.step()

    def get_extra_state(self) -> dict:
        adaptive = isinstance(self.margin, AdaptiveMargin)
        return {"adaptive_margin": self.margin.state_dict() if adaptive else None}

    def set_extra_state(self, state: dict) -> None:
        if state.get("adaptive_margin") is not None and isinstance(self.margin, AdaptiveMargin):
            self.margin.load_state_dict(state["adaptive_margin"])
