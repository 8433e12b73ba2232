"""Verification on pairs ("same class or not?"): ROC AUC, EER, TAR at FAR, best threshold."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from deepmetric.metrics._inputs import check_count

__all__ = ["sample_pairs", "verification_metrics"]


def _as_1d(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per pair), got shape {x.shape}")
    return x


def verification_metrics(
    scores: Any,
    is_same: Any,
    *,
    far: Sequence[float] = (1e-3, 1e-2),
    higher_is_same: bool = True,
) -> dict[str, float]:
    """ROC AUC, equal error rate, TAR at given FAR and the accuracy-maximising threshold.

    A pair is declared "same" when its score s >= t (or s <= t with ``higher_is_same=False``,
    e.g. for distances). With TAR(t) = TP(t)/P and FAR(t) = FP(t)/N over the distinct
    thresholds (scikit-learn's roc_curve):
        roc_auc = P(s+ > s-) + P(s+ = s-) / 2 (Hanley, McNeil 1982; scikit-learn)
        eer: the point where FAR = 1 - TAR, linearly interpolated between ROC points
        tar@far=f = max {TAR(t) : FAR(t) <= f} (no interpolation; Huang et al. 2007, LFW)
        best_threshold = argmax_t (TP(t) + TN(t)) / (P + N), the highest t among ties;
        best_accuracy is that accuracy.

    Parameters:
        scores: (num_pairs,) similarity scores (or distances with ``higher_is_same=False``).
        is_same: (num_pairs,) booleans, True for pairs of the same class.
        far: false accept rates in [0, 1] for "tar@far=<f>" (key formatted with ``:g``).
        higher_is_same: whether a larger score means "more likely the same class".

    Example:
        >>> m = verification_metrics([0.9, 0.8, 0.3, 0.1], [True, True, False, False])
        >>> m["roc_auc"], m["eer"], m["best_threshold"]
        (1.0, 0.0, 0.8)
    """
    scores = _as_1d(scores, "scores").astype(np.float64)
    is_same = _as_1d(is_same, "is_same")
    if is_same.dtype != bool:
        raise TypeError(f"is_same must be booleans, got dtype {is_same.dtype}")
    if len(scores) != len(is_same):
        raise ValueError(f"scores has {len(scores)} entries but is_same has {len(is_same)}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contains NaN or inf")
    positives, negatives = int(is_same.sum()), int((~is_same).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(
            f"verification needs both kinds of pairs, got {positives} same-class and "
            f"{negatives} different-class pairs"
        )
    far = tuple(float(f) for f in far)
    if any(not 0.0 <= f <= 1.0 for f in far):
        raise ValueError(f"far values must lie in [0, 1], got {far}")
    sign = 1.0 if higher_is_same else -1.0
    fpr, tpr, thresholds = roc_curve(is_same, sign * scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    gap = fpr - fnr  # increases along the curve, from -1 to 1
    cross = int(np.argmax(gap >= 0))
    if cross == 0 or gap[cross] == 0:
        eer = float(fpr[cross])
    else:
        step = -gap[cross - 1] / (gap[cross] - gap[cross - 1])
        eer = float(fpr[cross - 1] + step * (fpr[cross] - fpr[cross - 1]))
    accuracy = (tpr * positives + (1.0 - fpr) * negatives) / (positives + negatives)
    best = int(np.argmax(accuracy))
    out = {
        "roc_auc": float(roc_auc_score(is_same, sign * scores)),
        "eer": eer,
    }
    for f in far:
        out[f"tar@far={f:g}"] = float(tpr[fpr <= f].max())
    out["best_threshold"] = float(sign * thresholds[best])
    out["best_accuracy"] = float(accuracy[best])
    return out


def _as_codes(labels: Any, name: str) -> np.ndarray:
    labels = _as_1d(labels, name)
    if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise ValueError(
            f"{name} must be non-negative integer class codes (dtype {labels.dtype} given); "
            "map labels to codes first, e.g. np.unique(labels, return_inverse=True)[1]"
        )
    return labels.astype(np.int64)


def sample_pairs(
    query_labels: np.ndarray,
    reference_labels: np.ndarray,
    num_pairs: int,
    *,
    seed: int = 0,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded sample of up to ``num_pairs`` same-class and ``num_pairs`` other-class pairs.

    Same-class pairs: a query drawn uniformly among those with a relevant reference, then one
    of its relevant references uniformly. Other-class pairs: a query drawn uniformly, then a
    reference of another class uniformly (rejection sampling). With ``exclude_self`` query i
    is reference i and is never paired with itself.

    Parameters:
        query_labels: (num_queries,) int64 class codes.
        reference_labels: (num_reference,) int64 class codes.
        num_pairs: pairs of each kind.
        seed: random seed.
        exclude_self: the queries are the reference set.

    Returns:
        (query_index, reference_index, is_same) arrays.

    Example:
        >>> q, r, same = sample_pairs(np.array([0, 0, 1]), np.array([0, 0, 1]), 2,
        ...                           exclude_self=True)
        >>> same.tolist()
        [True, True, False, False]
    """
    query_labels = _as_codes(query_labels, "query_labels")
    reference_labels = _as_codes(reference_labels, "reference_labels")
    check_count(num_pairs, "num_pairs")
    check_count(seed, "seed", minimum=0)
    if exclude_self and len(query_labels) != len(reference_labels):
        raise ValueError(
            f"exclude_self needs the queries to be the reference set, but query_labels has "
            f"{len(query_labels)} entries and reference_labels {len(reference_labels)}"
        )
    rng = np.random.default_rng(seed)
    order = np.argsort(reference_labels, kind="stable")
    counts = np.bincount(reference_labels, minlength=int(query_labels.max(initial=0)) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    own = counts[query_labels] if len(counts) else np.zeros(len(query_labels), np.int64)
    relevant = own - int(exclude_self)
    eligible = np.flatnonzero(relevant > 0)
    pos_q = np.empty(0, np.int64)
    pos_r = np.empty(0, np.int64)
    if len(eligible):
        pos_q = rng.choice(eligible, size=num_pairs)
        offset = (rng.random(num_pairs) * relevant[pos_q]).astype(np.int64)
        pos_r = order[starts[query_labels[pos_q]] + offset]
        if exclude_self:
            last = order[starts[query_labels[pos_q]] + own[pos_q] - 1]
            pos_r = np.where(pos_r == pos_q, last, pos_r)
    others = np.flatnonzero(own < len(reference_labels))
    neg_q = np.empty(0, np.int64)
    neg_r = np.empty(0, np.int64)
    if len(others):
        neg_q = rng.choice(others, size=num_pairs)
        neg_r = rng.integers(0, len(reference_labels), size=num_pairs)
        for _ in range(100):
            bad = reference_labels[neg_r] == query_labels[neg_q]
            if not bad.any():
                break
            neg_r[bad] = rng.integers(0, len(reference_labels), size=int(bad.sum()))
        keep = reference_labels[neg_r] != query_labels[neg_q]
        neg_q, neg_r = neg_q[keep], neg_r[keep]
    is_same = np.concatenate([np.ones(len(pos_q), bool), np.zeros(len(neg_q), bool)])
    return np.concatenate([pos_q, neg_q]), np.concatenate([pos_r, neg_r]), is_same
