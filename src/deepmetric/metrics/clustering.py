"""Clustering quality: NMI and AMI of k-means with k = number of classes."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from deepmetric import index as _index
from deepmetric.metrics._inputs import as_embeddings, as_labels, encode_labels

__all__ = ["clustering_scores", "kmeans"]


def kmeans(
    embeddings: Any, num_clusters: int, *, seed: int = 0, num_iterations: int = 20
) -> np.ndarray:
    """Cluster assignments of Lloyd's k-means (Lloyd 1982), seeded, on every point.

    Minimises sum_i |x_i - c_{a(i)}|^2 with faiss.Kmeans (all points used for training, no
    subsampling), or scikit-learn's KMeans when faiss is absent.

    Parameters:
        embeddings: (N, D) float array or tensor.
        num_clusters: k, 1 <= k <= N.
        seed: random seed of the initialisation.
        num_iterations: Lloyd iterations.

    Example:
        >>> x = np.array([[0.0], [0.1], [5.0], [5.1]])
        >>> a = kmeans(x, 2)
        >>> bool(a[0] == a[1] and a[2] == a[3] and a[0] != a[2])
        True
    """
    x = as_embeddings(embeddings, "embeddings")
    if not 1 <= num_clusters <= len(x):
        raise ValueError(f"num_clusters must be between 1 and {len(x)}, got {num_clusters}")
    faiss = _index._load_faiss()
    if faiss is None:
        from sklearn.cluster import KMeans

        model = KMeans(num_clusters, n_init=1, max_iter=num_iterations, random_state=seed)
        return model.fit_predict(x).astype(np.int64)
    model = faiss.Kmeans(
        x.shape[1],
        num_clusters,
        niter=num_iterations,
        seed=seed,
        max_points_per_centroid=max(256, -(-len(x) // num_clusters)),
        min_points_per_centroid=1,
        verbose=False,
    )
    model.train(x)
    _, assignment = model.index.search(x, 1)
    return assignment[:, 0].astype(np.int64)


def clustering_scores(
    embeddings: Any, labels: Any, *, seed: int = 0, num_iterations: int = 20
) -> dict[str, float]:
    """NMI and AMI between the classes and a k-means clustering with k = number of classes.

    NMI = I(Y; A) / ((H(Y) + H(A)) / 2) (Strehl, Ghosh 2002, arithmetic mean);
    AMI = (I - E[I]) / ((H(Y) + H(A)) / 2 - E[I]) (Vinh, Epps, Bailey 2010), both computed by
    scikit-learn, with A the k-means assignment of `kmeans`.

    Parameters:
        embeddings: (N, D) float array or tensor.
        labels: (N,) class labels, integers or strings.
        seed: k-means seed.
        num_iterations: k-means iterations.

    Example:
        >>> x = np.array([[0.0], [0.1], [5.0], [5.1]])
        >>> clustering_scores(x, ["a", "a", "b", "b"])["nmi"]
        1.0
    """
    x = as_embeddings(embeddings, "embeddings")
    labels = as_labels(labels, len(x), "labels", "embeddings")
    classes, (codes,) = encode_labels(labels)
    assignment = kmeans(x, len(classes), seed=seed, num_iterations=num_iterations)
    return {
        "nmi": float(normalized_mutual_info_score(codes, assignment)),
        "ami": float(adjusted_mutual_info_score(codes, assignment)),
    }
