"""Classification is not ranking: nearest-centre vs nearest-neighbour, and the implied margin.

Su Jianlin (2021), "From the triangle inequality to margin softmax" (seed 000): a sample z1 of
class c1 can be closer to its own class centre than to any other centre, d(z1, c1) <
d(z1, c2), and still have a nearest neighbour z2 of class c2 closer than its classmate z3.
By the triangle inequality, d(z1, z3) <= d(z1, c1) + d(z3, c1) and d(z1, z2) >= d(z1, c2) -
d(z2, c2), so the ranking is right whenever

    d(z1, c1) + m < d(z1, c2),   m = d(z3, c1) + d(z2, c2),

and m, the sum of two within-class radii, is the "mean class diameter": the margin a
classification loss needs for its embedding to rank (AM-Softmax, Wang et al. 2018). For
cosine geometry the metric is d(x, y) = sqrt(1 - cos(x, y)), and the condition becomes
cos(z1, c1) - cos(z1, c2) > m (sqrt(1 - cos(z1, c2)) + sqrt(1 - cos(z1, c1))).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deepmetric.metrics._inputs import as_embeddings, as_labels, encode_labels
from deepmetric.neighbours import Neighbours

__all__ = ["DISTANCES", "margin_diagnostics"]

DISTANCES = ("euclidean", "cosine")
_BLOCK_ENTRIES = 1 << 24


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def _to_centres(
    points: np.ndarray, own_column: np.ndarray, centres: np.ndarray, distance: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point: the nearest centre's column, d(point, own centre), d(nearest other centre).

    Computed block by block (at most 2**24 distances at a time) in float64.
    """
    c = torch.from_numpy(centres.astype(np.float64))
    c_sq = (c * c).sum(dim=1)
    nearest = np.empty(len(points), dtype=np.int64)
    own = np.empty(len(points))
    other = np.empty(len(points))
    rows = max(1, _BLOCK_ENTRIES // max(len(centres), 1))
    for start in range(0, len(points), rows):
        stop = min(start + rows, len(points))
        p = torch.from_numpy(points[start:stop].astype(np.float64))
        if distance == "euclidean":
            sq = (p * p).sum(dim=1, keepdim=True) - 2.0 * p @ c.T + c_sq
        else:
            sq = 1.0 - p @ c.T
        block = sq.clamp_min_(0.0).sqrt_()
        nearest[start:stop] = block.argmin(dim=1).numpy()
        own_col = torch.from_numpy(own_column[start:stop])
        own[start:stop] = block.gather(1, own_col[:, None])[:, 0].numpy()
        block.scatter_(1, own_col[:, None], float("inf"))
        other[start:stop] = block.min(dim=1).values.numpy()
    return nearest, own, other


def margin_diagnostics(
    query: Any,
    query_labels: Any,
    neighbours: Neighbours,
    reference: Any = None,
    reference_labels: Any = None,
    *,
    distance: str = "euclidean",
) -> dict[str, float]:
    """Seed 000's diagnostic: centre-right but neighbour-wrong share, class diameter, margin.

    With class centres c_y = mean of the reference embeddings of class y (of unit vectors for
    cosine) and d the Euclidean distance (or sqrt(1 - cos) for cosine):
        nearest_centre_accuracy = mean_i [argmin_y d(z_i, c_y) = y_i]
        centre_right_nn_wrong = mean_i [argmin_y d(z_i, c_y) = y_i and label(nn_i) != y_i]
        class_diameter = 2 * mean_r d(r, c_{y_r}) over references whose class has >= 2 members
        suggested_margin = class_diameter (the m of d(z1, c1) + m < d(z1, c2))
    and for cosine also
        suggested_cosine_margin = m * mean_i (sqrt(1 - cos(z_i, c_{y_i}))
                                              + sqrt(1 - cos(z_i, c_other,i))),
    the additive cosine margin (AM-Softmax) that the derivation implies at the measured
    angles, c_other,i being the nearest centre of another class. Means run over queries with
    at least one relevant reference, as for the retrieval metrics (when the reference is the
    query set, each centre includes the query itself). Su Jianlin 2021, see the module
    docstring.

    Parameters:
        query: (num_queries, D) embeddings.
        query_labels: (num_queries,) labels.
        neighbours: k-NN of the queries in the reference set with labels (k >= 1); only the
            first neighbour is read.
        reference: (num_reference, D) embeddings; None means the query set.
        reference_labels: (num_reference,) labels; None means query_labels.
        distance: "euclidean" or "cosine" (inner products are not a metric).

    Example:
        >>> x = np.array([[0.0], [1.0], [1.4], [3.0]]); y = ["a", "a", "b", "b"]
        >>> nb = Neighbours(np.array([[1], [2], [1], [2]]), np.zeros((4, 1)),
        ...                 np.array([["a"], ["b"], ["a"], ["b"]]))
        >>> margin_diagnostics(x, y, nb)["centre_right_nn_wrong"]
        0.5
    """
    if distance not in DISTANCES:
        raise ValueError(
            f"distance must be one of {DISTANCES} for the margin diagnostic (it needs a "
            f"metric), got {distance!r}"
        )
    query = as_embeddings(query, "query")
    query_labels = as_labels(query_labels, len(query), "query_labels", "query")
    exclude_self = reference is None
    if exclude_self:
        reference, reference_labels = query, query_labels
    reference = as_embeddings(reference, "reference")
    if reference_labels is None:
        raise ValueError("reference_labels is required when reference is given")
    reference_labels = as_labels(reference_labels, len(reference), "reference_labels", "reference")
    if reference.shape[1] != query.shape[1]:
        raise ValueError(
            f"query has dim {query.shape[1]} but reference has dim {reference.shape[1]}"
        )
    if neighbours.num_queries != len(query) or neighbours.k < 1 or neighbours.labels is None:
        raise ValueError(
            f"neighbours must hold at least 1 labelled neighbour for each of the {len(query)} "
            f"queries, got {neighbours.num_queries} rows and k={neighbours.k}"
        )
    classes, (q_codes, r_codes, nn_codes) = encode_labels(
        query_labels, reference_labels, neighbours.labels[:, 0]
    )
    return _diagnostics(
        query,
        q_codes,
        reference,
        r_codes,
        nn_codes,
        neighbours.indices[:, 0] >= 0,
        distance,
        exclude_self,
    )


def _diagnostics(
    query: np.ndarray,
    q_codes: np.ndarray,
    reference: np.ndarray,
    r_codes: np.ndarray,
    nn_codes: np.ndarray,
    nn_found: np.ndarray,
    distance: str,
    exclude_self: bool,
) -> dict[str, float]:
    """The numeric part of `margin_diagnostics`, on encoded labels."""
    if distance == "cosine":
        query, reference = _unit(query), _unit(reference)
    num_classes = int(max(q_codes.max(initial=0), r_codes.max(initial=0))) + 1
    counts = np.bincount(r_codes, minlength=num_classes)
    sums = torch.zeros(num_classes, reference.shape[1], dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(r_codes), torch.from_numpy(reference).double())
    present = np.flatnonzero(counts > 0)
    centres = sums.numpy()[present] / counts[present, None]
    if distance == "cosine":
        centres = _unit(centres)
    column = np.full(num_classes, -1, dtype=np.int64)
    column[present] = np.arange(len(present))

    valid = counts[q_codes] >= 1 + int(exclude_self)
    nearest, own, other = _to_centres(query, np.maximum(column[q_codes], 0), centres, distance)
    centre_right = valid & (present[nearest] == q_codes)
    nn_wrong = (nn_codes != q_codes) | ~nn_found
    _, radius, _ = _to_centres(reference, column[r_codes], centres, distance)
    in_class = counts[r_codes] >= 2
    diameter = float(2.0 * radius[in_class].mean()) if in_class.any() else float("nan")
    nan = float("nan")
    out = {
        "nearest_centre_accuracy": float(centre_right[valid].mean()) if valid.any() else nan,
        "centre_right_nn_wrong": float((centre_right & nn_wrong)[valid].mean())
        if valid.any()
        else nan,
        "class_diameter": diameter,
        "suggested_margin": diameter,
    }
    if distance == "cosine":
        finite = valid & np.isfinite(other)
        spread = float((own[finite] + other[finite]).mean()) if finite.any() else nan
        out["suggested_cosine_margin"] = diameter * spread
    return out
