"""Cluster-level losses (SPEC §4): coupled clusters, facility location, deep clustering.

These losses compare the batch with its own class structure (class centres, medoids, the
label affinity matrix), so they take no mined `indices_tuple`; the coupled clusters and
facility location losses also need the batch itself as the reference set and refuse `ref_emb`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric._validation import check_non_negative
from deepmetric.distances import (
    BaseDistance,
    DotProductSimilarity,
    EuclideanDistance,
    SquaredEuclideanDistance,
)
from deepmetric.losses._blocks import StructuredStats
from deepmetric.losses.base import (
    DistanceRule,
    LossInputs,
    MetricLoss,
    any_distance,
    checked,
    prepare_inputs,
)
from deepmetric.losses.reduction import reduce_terms


def _batch_structure_only(
    name: str, indices_tuple, ref_emb, allow_ref: bool = False, ids: tuple = (None, None)
) -> None:
    if any(item_ids is not None for item_ids in ids):
        raise ValueError(
            f"{name} works on the classes of the whole batch and pairs no rows by identity, so "
            "query_ids / ref_ids are not supported; call it on the batch without ids"
        )
    if indices_tuple is not None:
        raise ValueError(
            f"{name} works on the classes of the whole batch, not on mined pairs: call it "
            "without indices_tuple (apply a miner to a pair or triplet loss instead)"
        )
    if ref_emb is not None and not allow_ref:
        raise ValueError(
            f"{name} needs the batch's own class structure (centres or medoids of the batch), "
            "so ref_emb / ref_labels are not supported; pass the reference items in the batch"
        )


def _labelled_inputs(
    name, embeddings, labels, indices_tuple, ref_emb, ref_labels, allow_ref, ids=(None, None)
):
    _batch_structure_only(name, indices_tuple, ref_emb, allow_ref, ids)
    if labels is None:
        raise ValueError(f"{name} needs labels")
    if isinstance(labels, Tensor) and labels.dim() == 2:
        raise ValueError(
            f"{name} needs one class id per row (1-D labels): it builds class centres or "
            "clusters, which multi-hot label sets do not define"
        )
    return prepare_inputs(embeddings, labels, None, ref_emb, ref_labels)


# ---------------------------------------------------------------------------------------------
# Coupled clusters loss


@checked(any_distance(SquaredEuclideanDistance), margin=check_non_negative)
def coupled_clusters_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 1.0,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, StructuredStats]:
    """Coupled clusters loss (Liu, Tian, Yang, Pang & Huang 2016; survey eq. 5-6).

    For each class p of the batch with at least two members, the centre
    c_p = 1/N_p sum_i f(x_i^p) (eq. 5), and

        L = sum_p sum_{i in p} 1/2 [ D(f(x_i^p), c_p) + alpha - D(f(x_*^n), c_p) ]+    (eq. 6)

    where x_*^n is the negative (any other class) nearest to the centre, as in Liu et al.; D is
    the squared Euclidean distance of the paper by default. Gradients flow through the centres.
    Cost O(N C D) for C classes.

    Args:
        margin: alpha, >= 0 (units of `distance`: squared Euclidean by default).
        distance: any `BaseDistance` between embeddings and centres; a similarity s enters as
            D = -s.
        reduction: "mean" over the positives (members of classes with >= 2 items that have a
            negative), "nonzero_mean" or "sum" (the paper's sum).
        return_stats: also return a `StructuredStats` (terms: those positives).

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> coupled_clusters_loss(x, y, margin=1.0) >= 0
        tensor(True)
    """
    ids = (query_ids, ref_ids, relevance)
    inputs = _labelled_inputs(
        "coupled_clusters_loss", embeddings, labels, indices_tuple, ref_emb, ref_labels, False, ids
    )
    x = inputs.embeddings
    _, class_of, sizes = torch.unique(inputs.labels, return_inverse=True, return_counts=True)
    centres = torch.zeros(len(sizes), x.shape[1], dtype=x.dtype, device=x.device)
    centres = centres.index_add(0, class_of, x) / sizes.unsqueeze(1).to(x.dtype)
    dis = distance.as_dissimilarity(distance(x, centres))
    own = class_of.unsqueeze(1) == torch.arange(len(sizes), device=x.device).unsqueeze(0)
    nearest_negative = dis.masked_fill(own, torch.inf).amin(dim=0)
    gap = nearest_negative[class_of]
    is_term = (sizes[class_of] >= 2) & torch.isfinite(gap)
    pos = dis.gather(1, class_of.unsqueeze(1)).squeeze(1)
    terms = 0.5 * F.relu(pos + margin - gap.masked_fill(~is_term, 0)).masked_fill(~is_term, 0)
    loss = inputs.finish(reduce_terms(terms, reduction, is_term))
    if not return_stats:
        return loss
    stats = StructuredStats(num_terms=is_term.sum(), num_active=((terms > 0) & is_term).sum())
    return loss, stats


class CoupledClustersLoss(MetricLoss):
    """Coupled clusters loss module; see `coupled_clusters_loss` for the formula and arguments.

    Example:
        >>> loss_fn = CoupledClustersLoss(margin=1.0)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(coupled_clusters_loss)
    local_anchor_supported = False
    local_anchor_reason = "it compares each row with the centre of its class over the whole batch"


# ---------------------------------------------------------------------------------------------
# Facility location (clustering) loss


@dataclass(frozen=True)
class FacilityLocationStats:
    """What the last facility location loss call found (tensors).

    `medoids` are the greedy loss-augmented medoids (batch indices, in the order chosen),
    `nmi` the NMI between their clustering and the labels, `score` F(X, S) of eq. 8 for them,
    `oracle_score` F~(X, y*) of eq. 9.
    """

    medoids: Tensor
    nmi: Tensor
    score: Tensor
    oracle_score: Tensor


@checked(any_distance(EuclideanDistance), margin_multiplier=check_non_negative)
def facility_location_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin_multiplier: float = 1.0,
    distance: BaseDistance | None = None,
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, FacilityLocationStats]:
    """Facility location (clustering) loss (Song, Jegelka, Rathod & Murphy 2017; survey eq. 8-11).

        F(X, S) = -sum_i min_{j in S} D_ij                                         (eq. 8)
        F~(X, y*) = sum_k max_{j in class k} F(X_k, {j})                           (eq. 9)
        L = [ max_{|S| = K} { F(X, S) + gamma (1 - NMI(y(S), y*)) } - F~(X, y*) ]+   (eq. 10)

    y(S) assigns each item to its nearest medoid (the earliest chosen on ties), NMI =
    MI / sqrt(H(y) H(y*)) (eq. 11), K the number of classes in the batch. The maximum over S
    is the paper's greedy loss-augmented inference: K steps, each adding the item that most
    increases F + gamma (1 - NMI). The paper's optional refinement (medoid swaps) is not done.
    Gradients flow through the distances of each item to its chosen medoid and to its class's
    medoid. The loss is one structured hinge over the batch (no reduction).

    Cost: one sort of the N x N matrix (O(N^2 log N) time, 12 N^2 bytes), then each greedy step
    touches only the (item, candidate) pairs closer than the item's current medoid, about
    N^2 / t at step t, O(N^2 log K) entries in all, grouped by one sort per step. About 15-20
    times the pair floor at N = 4096 (see docs/losses_structured.md).

    Args:
        margin_multiplier: gamma, >= 0 (distance units: the structured margin's weight).
        distance: any `BaseDistance` (default Euclidean, as the paper); a similarity s enters
            as D = -s.
        return_stats: also return a `FacilityLocationStats`.

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> facility_location_loss(x, y) >= 0
        tensor(True)
    """
    ids = (query_ids, ref_ids, relevance)
    inputs = _labelled_inputs(
        "facility_location_loss", embeddings, labels, indices_tuple, ref_emb, ref_labels, False, ids
    )
    x = inputs.embeddings
    _, truth = torch.unique(inputs.labels, return_inverse=True)
    num_classes = int(truth.max()) + 1
    with torch.no_grad():
        dis = distance.as_dissimilarity(distance(x))
        medoids, assignment = greedy_medoids(dis, truth, num_classes, margin_multiplier)
        nmi = normalized_mutual_info(assignment, truth)
        class_cost = torch.zeros(num_classes, len(x), dtype=dis.dtype, device=x.device)
        class_cost.index_add_(0, truth, dis)
        own_cost = class_cost.gather(0, truth.unsqueeze(0)).squeeze(0)
        best = torch.full((num_classes,), torch.inf, dtype=dis.dtype, device=x.device)
        best.scatter_reduce_(0, truth, own_cost, reduce="amin")
        candidates = torch.where(
            own_cost == best[truth], torch.arange(len(x), device=x.device), len(x)
        )
        class_medoid = torch.full((num_classes,), len(x), device=x.device).scatter_reduce_(
            0, truth, candidates, reduce="amin"
        )
    chosen = distance.as_dissimilarity(distance.pairwise_distance(x, x[medoids[assignment]]))
    oracle = distance.as_dissimilarity(distance.pairwise_distance(x, x[class_medoid[truth]]))
    score, oracle_score = -chosen.sum(), -oracle.sum()
    structured = score + margin_multiplier * (1 - nmi.to(x.dtype)) - oracle_score
    loss = inputs.finish(F.relu(structured))
    if not return_stats:
        return loss
    stats = FacilityLocationStats(
        medoids=medoids, nmi=nmi, score=score.detach(), oracle_score=oracle_score.detach()
    )
    return loss, stats


def _entropy_sum(counts: Tensor) -> Tensor:
    """sum n log n over counts (0 log 0 = 0), in float64."""
    counts = counts.double()
    return torch.xlogy(counts, counts).sum(dim=-1)


def normalized_mutual_info(assignment: Tensor, truth: Tensor) -> Tensor:
    """NMI(a, b) = MI / ((H(a) + H(b)) / 2) of two labelings (survey eq. 11), float64.

    The arithmetic mean of the entropies normalises, as scikit-learn's default
    (`average_method="arithmetic"`) and `deepmetric.metrics` do, so the loss's structured
    margin and the reported clustering metric are the same number. 1 when both put everything
    in one cluster, 0 when exactly one of them does.

    Example:
        >>> float(normalized_mutual_info(torch.tensor([0, 0, 1, 1]), torch.tensor([5, 5, 7, 7])))
        1.0
    """
    n = len(assignment)
    _, a = torch.unique(assignment, return_inverse=True)
    _, b = torch.unique(truth, return_inverse=True)
    joint = torch.unique(a * (int(b.max()) + 1) + b, return_counts=True)[1]
    log_n = torch.log(torch.tensor(float(n), dtype=torch.float64, device=a.device))
    h_a = log_n - _entropy_sum(torch.bincount(a)) / n
    h_b = log_n - _entropy_sum(torch.bincount(b)) / n
    h_ab = log_n - _entropy_sum(joint) / n
    return _nmi_from_entropies(h_a, h_b, h_ab)


def _nmi_from_entropies(h_a: Tensor, h_b: Tensor, h_ab: Tensor) -> Tensor:
    eps = 1e-12
    mutual = h_a + h_b - h_ab
    both_trivial = (h_a < eps) & (h_b < eps)
    denominator = (h_a.clamp_min(0) + h_b.clamp_min(0)) / 2
    nmi = torch.where(denominator > eps, mutual / denominator.clamp_min(eps), 0.0)
    return torch.where(both_trivial, 1.0, nmi.clamp(0, 1)).to(torch.float64)


def greedy_medoids(
    dis: Tensor, truth: Tensor, num_classes: int, margin_multiplier: float
) -> tuple[Tensor, Tensor]:
    """Greedy maximiser of F(X, S) + gamma (1 - NMI(y(S), y*)) over |S| = num_classes.

    `dis` is the (N, N) dissimilarity, `truth` class ids in [0, num_classes). Returns the
    medoids in the order chosen and each item's cluster (position in that order; an item
    moves to a new medoid only when strictly closer, so ties keep the earliest medoid).

    For a candidate j only the items with D_ij < m_i (m_i: distance to the current medoid)
    change cluster. Each row of D is sorted once, so those items are a prefix of the row, and
    the change of F and of the entropies H(y), H(y, y*) is computed from the (item, candidate)
    pairs of these prefixes alone (see `_entropy_changes`).
    """
    n = len(dis)
    device = dis.device
    first = int(torch.argmin(dis.sum(dim=0)))
    medoids = [first]
    cluster = torch.zeros(n, dtype=torch.long, device=device)
    nearest = dis[:, first].clone()
    if num_classes == 1 or n == 1:
        return torch.tensor(medoids, device=device), cluster
    sorted_dis, order = dis.sort(dim=1)
    n_float = float(n)
    log_n = torch.log(torch.tensor(n_float, dtype=torch.float64))
    class_sizes = torch.bincount(truth, minlength=num_classes)
    h_truth = log_n - _entropy_sum(class_sizes) / n
    cluster_sizes = torch.zeros(num_classes, dtype=torch.long, device=device)
    cluster_sizes[0] = n
    cells = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    cells[0] = class_sizes
    cell_phi_total = _entropy_sum(class_sizes)
    score = -float(nearest.double().sum())
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    taken[first] = True
    arange = torch.arange(n, device=device)
    lengths = torch.searchsorted(sorted_dis, nearest.unsqueeze(1)).squeeze(1)
    for step in range(1, num_classes):
        item = torch.repeat_interleave(arange, lengths)
        offset = arange * n - (torch.cumsum(lengths, 0) - lengths)
        flat = torch.arange(len(item), device=device) + offset[item]
        candidate = torch.take(order, flat)
        gain = torch.zeros(n, dtype=torch.float64, device=device).index_add_(
            0, candidate, (nearest[item] - torch.take(sorted_dis, flat)).double()
        )
        cluster_phi, cell_phi = _entropy_changes(
            candidate, cluster[item], truth[item], cluster_sizes, cells, n
        )
        cluster_phi += _entropy_sum(cluster_sizes)
        cell_phi += cell_phi_total
        h_cluster = log_n - cluster_phi / n
        h_joint = log_n - cell_phi / n
        nmi = _nmi_from_entropies(h_cluster, h_truth.expand_as(h_cluster), h_joint)
        value = score + gain + margin_multiplier * (1 - nmi)
        best = int(torch.argmax(value.masked_fill(taken, -torch.inf)))
        switch = dis[:, best] < nearest
        old = cluster[switch]
        touched = torch.unique(old)
        cell_phi_total = cell_phi_total - _entropy_sum(cells[touched].flatten())
        cluster_sizes.index_add_(0, old, torch.full_like(old, -1))
        cells.index_put_((old, truth[switch]), torch.full_like(old, -1), accumulate=True)
        cluster[switch] = step
        cluster_sizes[step] = int(switch.sum())
        cells[step] = torch.bincount(truth[switch], minlength=num_classes)
        cell_phi_total = cell_phi_total + _entropy_sum(cells[touched].flatten())
        cell_phi_total = cell_phi_total + _entropy_sum(cells[step])
        nearest = torch.where(switch, dis[:, best], nearest)
        rows = switch.nonzero().squeeze(1)
        lengths[rows] = torch.searchsorted(sorted_dis[rows], nearest[rows].unsqueeze(1)).squeeze(1)
        score = -float(nearest.double().sum())
        taken[best] = True
        medoids.append(best)
    return torch.tensor(medoids, device=device), cluster


def _phi(counts: Tensor) -> Tensor:
    return torch.xlogy(counts, counts)


def _entropy_changes(
    candidate: Tensor,
    item_cluster: Tensor,
    item_class: Tensor,
    cluster_sizes: Tensor,
    cells: Tensor,
    n: int,
) -> tuple[Tensor, Tensor]:
    """Per candidate j, the change of sum phi(cluster sizes) and of sum phi(cell sizes) when
    the listed items (those closer to j than to their medoid) move to a new cluster j.

    phi(n) = n log n. The items are grouped once by (candidate, cluster, class), sorted; the
    (candidate, cluster) groups are runs of that order and the (candidate, class) groups come
    from the much shorter list of cells.
    """
    k = cells.shape[1]
    keys, moved = torch.unique((candidate * k + item_cluster) * k + item_class, return_counts=True)
    moved = moved.double()
    owner, cluster, klass = keys // (k * k), (keys // k) % k, keys % k

    def per_candidate(values: Tensor, who: Tensor) -> Tensor:
        return torch.zeros(n, dtype=torch.float64, device=keys.device).index_add_(0, who, values)

    size = cells[cluster, klass].double()
    cell_change = per_candidate(_phi(size - moved) - _phi(size), owner)
    prefixes, group = torch.unique_consecutive(keys // k, return_inverse=True)
    left = torch.zeros(len(prefixes), dtype=torch.float64, device=keys.device)
    left.index_add_(0, group, moved)
    size = cluster_sizes[prefixes % k].double()
    cluster_change = per_candidate(_phi(size - left) - _phi(size), prefixes // k)
    joined = per_candidate(moved, owner)
    classes, group = torch.unique(owner * k + klass, return_inverse=True)
    per_class = torch.zeros(len(classes), dtype=torch.float64, device=keys.device)
    per_class.index_add_(0, group, moved)
    cell_change += per_candidate(_phi(per_class), classes // k)
    return cluster_change + _phi(joined), cell_change


class FacilityLocationLoss(MetricLoss):
    """Facility location loss module; see `facility_location_loss` for the formula and arguments.

    `stats` holds the `FacilityLocationStats` of the last call (medoids, NMI, scores).

    Example:
        >>> loss_fn = FacilityLocationLoss(margin_multiplier=1.0)
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(facility_location_loss)
    local_anchor_supported = False
    local_anchor_reason = "its clustering score (medoids, NMI) is a function of the whole batch"


# ---------------------------------------------------------------------------------------------
# Deep clustering affinity loss


@dataclass(frozen=True)
class DeepClusteringStats:
    """What a `deep_clustering_loss` call reports: `loss == loss_sum / normaliser`.

    loss_sum: ||V R^T - Y Y_r^T||_F^2 (float64, with grad).
    normaliser: the number of affinity entries N M for reduction="mean", 1 for "sum".
    """

    loss_sum: Tensor
    normaliser: int


INNER_PRODUCT = DistanceRule(
    DotProductSimilarity,
    lambda d: isinstance(d, DotProductSimilarity),
    "an inner-product affinity V V^T: DotProductSimilarity() or CosineSimilarity()",
)


def _mean_or_sum(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"reduction must be 'mean' or 'sum' for deep_clustering_loss, got {reduction!r} "
            "('nonzero_mean' would need the N x N residual)"
        )


@checked(INNER_PRODUCT, together=_mean_or_sum)
def deep_clustering_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices_tuple: tuple | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    distance: BaseDistance | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    query_ids: Tensor | None = None,
    ref_ids: Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor | tuple[Tensor, DeepClusteringStats]:
    """Deep clustering affinity loss (Hershey, Chen, Le Roux & Watanabe 2016).

        L = ||V V^T - Y Y^T||_F^2 = ||V^T V||_F^2 - 2 ||V^T Y||_F^2 + ||Y^T Y||_F^2

    V the (N, D) embeddings, Y the (N, C) one-hot labels. The right-hand side is computed from
    D x D, D x C and C-sized matrices in O(N D^2): the N x N affinity is never formed. With
    `ref_emb` (R, labels Y_r): ||V R^T - Y Y_r^T||_F^2 = <V^T V, R^T R> - 2 sum_c (V^T Y)_c .
    (R^T Y_r)_c + sum_c n_c m_c. Sums are taken in float64 (the three parts nearly cancel).

    Args:
        distance: the affinity: `DotProductSimilarity()` (default, raw V) or
            `CosineSimilarity()` (unit-length rows, as Hershey et al.); other distances are
            not inner products and are refused.
        reduction: "mean" (divided by the number of entries N M) or "sum" (the Frobenius
            norm of the paper).
        return_stats: also return a `DeepClusteringStats`.

    Example:
        >>> x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> deep_clustering_loss(x, y, reduction="sum") >= 0
        tensor(True)
    """
    inputs: LossInputs = _labelled_inputs(
        "deep_clustering_loss",
        embeddings,
        labels,
        indices_tuple,
        ref_emb,
        ref_labels,
        True,
        (query_ids, ref_ids, relevance),
    )
    v = distance.normalize(inputs.embeddings).double()
    r = v if inputs.ref_is_query else distance.normalize(inputs.ref_emb).double()
    classes, inverse = torch.unique(
        torch.cat([inputs.labels, inputs.ref_labels]), return_inverse=True
    )
    v_class, r_class = inverse[: len(v)], inverse[len(v) :]
    num = len(classes)
    v_sums = torch.zeros(num, v.shape[1], dtype=v.dtype, device=v.device).index_add(0, v_class, v)
    r_sums = v_sums
    if not inputs.ref_is_query:
        r_sums = torch.zeros_like(v_sums).index_add(0, r_class, r)
    gram = (v.T @ v) * (r.T @ r) if not inputs.ref_is_query else (v.T @ v).pow(2)
    label_part = (
        torch.bincount(v_class, minlength=num).double()
        * torch.bincount(r_class, minlength=num).double()
    ).sum()
    loss_sum = gram.sum() - 2 * (v_sums * r_sums).sum() + label_part
    normaliser = len(v) * len(r) if reduction == "mean" else 1
    loss = inputs.finish((loss_sum / normaliser).to(inputs.embeddings.dtype))
    if not return_stats:
        return loss
    return loss, DeepClusteringStats(loss_sum=loss_sum, normaliser=normaliser)


class DeepClusteringLoss(MetricLoss):
    """Deep clustering affinity loss module; see `deep_clustering_loss` for the formula.

    `stats` holds the `DeepClusteringStats` of the last call.

    Example:
        >>> from deepmetric.distances import CosineSimilarity
        >>> loss_fn = DeepClusteringLoss(distance=CosineSimilarity())
        >>> loss = loss_fn(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    function = staticmethod(deep_clustering_loss)
    local_anchor_supported = False
    local_anchor_reason = (
        "its affinity norm ||V V^T - Y Y^T|| couples every pair of rows through the whole batch"
    )
