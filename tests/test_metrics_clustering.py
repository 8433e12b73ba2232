"""NMI and AMI of seeded k-means, against scikit-learn on the same assignment."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

import deepmetric.index as index_module
from deepmetric.metrics import clustering_scores, evaluate, kmeans, kmeans_plus_plus


def blobs(num_classes=6, per_class=40, separation=50.0, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    centres = separation * rng.standard_normal((num_classes, 8))
    return (centres[labels] + rng.standard_normal((len(labels), 8))).astype(np.float32), labels


def test_scores_are_sklearn_scores_of_the_kmeans_assignment():
    x, labels = blobs(separation=1.5)
    assignment = kmeans(x, 6, seed=3)
    scores = clustering_scores(x, labels, seed=3)
    assert scores["nmi"] == normalized_mutual_info_score(labels, assignment)
    assert scores["ami"] == adjusted_mutual_info_score(labels, assignment)
    assert 0.0 < scores["ami"] < 1.0


def test_separated_classes_are_recovered_exactly():
    x, labels = blobs()
    assert clustering_scores(x, labels) == {"nmi": 1.0, "ami": 1.0}
    assert clustering_scores(x, [f"c{v}" for v in labels]) == {"nmi": 1.0, "ami": 1.0}


def test_seeded_and_deterministic():
    x, labels = blobs(separation=1.0)
    np.testing.assert_array_equal(kmeans(x, 6, seed=1), kmeans(x, 6, seed=1))
    assert clustering_scores(x, labels, seed=1) == clustering_scores(x, labels, seed=1)


def test_random_labels_have_ami_near_zero():
    x, _ = blobs(separation=1.0)
    labels = np.random.default_rng(9).integers(0, 6, size=len(x))
    assert abs(clustering_scores(x, labels)["ami"]) < 0.05


def test_kmeans_plus_plus_seeds_are_distinct_points_of_the_data():
    x, _ = blobs()
    seeds = kmeans_plus_plus(x, 6, seed=2)
    assert seeds.shape == (6, 8)
    assert len({tuple(s) for s in seeds}) == 6
    assert all((np.abs(x - s).sum(axis=1) == 0).any() for s in seeds)


def test_without_faiss_sklearn_kmeans_is_used(monkeypatch):
    monkeypatch.setattr(index_module, "_load_faiss", lambda: None)
    x, labels = blobs()
    assert clustering_scores(x, labels) == {"nmi": 1.0, "ami": 1.0}
    result = evaluate(x, labels, metrics=("nmi", "map@r"))
    assert result["nmi"] == 1.0 and result["map@r"] == 1.0


def test_errors():
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(np.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match="labels has 2 entries"):
        clustering_scores(np.zeros((3, 2)), [0, 1])
