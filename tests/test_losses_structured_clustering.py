"""Coupled clusters, facility location and deep clustering losses against slow references
(float64, values and gradients) and analytic values."""

from __future__ import annotations

import pytest
import reference_structured as ref
import torch
from reference_structured import SEEDS, assert_same, batch
from sklearn.metrics import normalized_mutual_info_score

from deepmetric.distances import (
    CosineSimilarity,
    DotProductSimilarity,
    EuclideanDistance,
    SquaredEuclideanDistance,
)
from deepmetric.losses.clustering import (
    CoupledClustersLoss,
    DeepClusteringLoss,
    FacilityLocationLoss,
    coupled_clusters_loss,
    deep_clustering_loss,
    facility_location_loss,
    greedy_medoids,
    normalized_mutual_info,
)

# ---------------------------------------------------------------------------------------------
# Coupled clusters loss


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("distance", [SquaredEuclideanDistance(), EuclideanDistance()])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_coupled_clusters_matches_reference(seed, distance, reduction):
    x, y, _, _ = batch(seed)

    def slow(x):
        loss = ref.coupled_clusters(x, y, distance, 2.0)
        if reduction == "sum":
            sizes = torch.bincount(torch.unique(y, return_inverse=True)[1])
            loss = loss * int(sizes[sizes >= 2].sum())
        return loss

    assert_same(
        lambda x: coupled_clusters_loss(x, y, margin=2.0, distance=distance, reduction=reduction),
        slow,
        x,
    )


def test_coupled_clusters_analytic_values():
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    collapsed = torch.zeros(6, 3, dtype=torch.float64)
    # Every distance to every centre is 0: each positive costs alpha / 2.
    assert float(coupled_clusters_loss(collapsed, y, margin=0.8)) == pytest.approx(0.4)
    separated = 10 * torch.eye(3, dtype=torch.float64)[y]
    assert float(coupled_clusters_loss(separated, y, margin=0.8)) == 0.0
    # Class 2 is a singleton: no centre of its own, but a negative of the others.
    loss, stats = coupled_clusters_loss(collapsed, y, return_stats=True)
    assert int(stats.num_terms) == 5


# ---------------------------------------------------------------------------------------------
# Facility location loss


def test_normalized_mutual_info_matches_counts_and_sklearn():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.randint(0, 4, (30,), generator=gen)
        b = torch.randint(0, 3, (30,), generator=gen) * 7 - 5
        expected = ref.nmi(a.tolist(), b.tolist())
        assert float(normalized_mutual_info(a, b)) == pytest.approx(expected)
        sklearn = normalized_mutual_info_score(a, b)  # scikit-learn's default: arithmetic
        assert float(normalized_mutual_info(a, b)) == pytest.approx(sklearn)
    ones = torch.zeros(5, dtype=torch.long)
    assert float(normalized_mutual_info(ones, ones)) == 1.0
    assert float(normalized_mutual_info(ones, torch.arange(5))) == 0.0


@pytest.mark.parametrize("seed", SEEDS + [3, 4])
@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_facility_location_matches_reference(seed, gamma):
    x, y, _, _ = batch(seed, n=12, dim=4)
    distance = EuclideanDistance()
    _, medoids = ref.facility_location(x, y, distance, gamma)
    _, stats = facility_location_loss(x, y, margin_multiplier=gamma, return_stats=True)
    assert stats.medoids.tolist() == medoids
    assert_same(
        lambda x: facility_location_loss(x, y, margin_multiplier=gamma),
        lambda x: ref.facility_location(x, y, distance, gamma)[0],
        x,
    )


def test_greedy_step_uses_the_loss_augmented_score():
    # With a large gamma the NMI term dominates the greedy choice.
    x, y, _, _ = batch(7, n=12, dim=4)
    distance = EuclideanDistance()
    for gamma in (0.0, 50.0):
        _, medoids = ref.facility_location(x, y, distance, gamma)
        truth = torch.unique(y, return_inverse=True)[1]
        dis = distance(x)
        found, _ = greedy_medoids(dis, truth, int(truth.max()) + 1, gamma)
        assert found.tolist() == medoids


def test_facility_location_analytic_values():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    points = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]], dtype=torch.float64)
    jitter = torch.tensor(
        [[0.1, 0], [0, 0.1], [-0.1, 0], [0.1, 0], [0, -0.1], [0, 0.1], [0.1, 0], [0, 0]]
    )
    separated = points[y] + jitter.double()
    loss, stats = facility_location_loss(separated, y, return_stats=True)
    assert float(loss) == 0.0 and float(stats.nmi) == pytest.approx(1.0)
    one_class = torch.randn(5, 3, dtype=torch.float64)
    assert float(facility_location_loss(one_class, torch.zeros(5, dtype=torch.long))) == 0.0
    assert float(facility_location_loss(one_class, torch.arange(5))) == 0.0


# ---------------------------------------------------------------------------------------------
# Deep clustering affinity loss


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("distance", [DotProductSimilarity(), CosineSimilarity()])
def test_deep_clustering_matches_reference(seed, distance):
    x, y, r, ry = batch(seed, num_ref=9)
    assert_same(
        lambda x: deep_clustering_loss(x, y, distance=distance, reduction="sum"),
        lambda x: ref.deep_clustering(distance.normalize(x), distance.normalize(x), y, y),
        x,
    )
    assert_same(
        lambda x, r: deep_clustering_loss(x, y, ref_emb=r, ref_labels=ry, distance=distance),
        lambda x, r: (
            ref.deep_clustering(distance.normalize(x), distance.normalize(r), y, ry)
            / (len(x) * len(r))
        ),
        x,
        r,
    )


def test_deep_clustering_analytic_values():
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    one_hot = torch.eye(3, dtype=torch.float64)[y]
    assert float(deep_clustering_loss(one_hot, y, reduction="sum")) == pytest.approx(0, abs=1e-12)
    collapsed = torch.ones(6, 4, dtype=torch.float64)
    # Unit rows all equal: V V^T is all ones, the residual is 1 on every negative pair.
    negative_pairs = int((y.unsqueeze(0) != y.unsqueeze(1)).sum())
    value = deep_clustering_loss(collapsed, y, distance=CosineSimilarity(), reduction="sum")
    assert float(value) == pytest.approx(negative_pairs)


def test_deep_clustering_memory_is_linear_in_n():
    # N = 50_000 would need a 10 GB N x N affinity; the D x D form needs a few MB.
    x = torch.randn(50_000, 16)
    y = torch.randint(0, 100, (50_000,))
    value = deep_clustering_loss(x.requires_grad_(), y, distance=CosineSimilarity())
    value.backward()
    assert torch.isfinite(x.grad).all()


def test_cluster_losses_refuse_what_they_cannot_use():
    x, y, r, ry = batch(0, num_ref=5)
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    for loss in (coupled_clusters_loss, facility_location_loss, deep_clustering_loss):
        with pytest.raises(ValueError, match="indices_tuple"):
            loss(x, y, pairs)
    for loss in (coupled_clusters_loss, facility_location_loss):
        with pytest.raises(ValueError, match="ref_emb"):
            loss(x, y, ref_emb=r, ref_labels=ry)
    with pytest.raises(ValueError, match="inner-product"):
        deep_clustering_loss(x, y, distance=EuclideanDistance())
    with pytest.raises(ValueError, match="reduction"):
        DeepClusteringLoss(reduction="nonzero_mean")


def test_modules_match_functions():
    x, y, _, _ = batch(2)
    torch.testing.assert_close(
        CoupledClustersLoss(margin=0.5)(x, y), coupled_clusters_loss(x, y, margin=0.5)
    )
    module = FacilityLocationLoss(margin_multiplier=2.0)
    torch.testing.assert_close(module(x, y), facility_location_loss(x, y, margin_multiplier=2.0))
    assert module.stats.medoids.shape == (len(torch.unique(y)),)
    torch.testing.assert_close(DeepClusteringLoss()(x, y), deep_clustering_loss(x, y))
