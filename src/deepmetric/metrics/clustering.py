"""Clustering quality: NMI and AMI of k-means with k = number of classes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from deepmetric import index as _index
from deepmetric.metrics._inputs import as_embeddings, as_labels, check_count, encode_labels

__all__ = ["clustering_scores", "kmeans", "kmeans_plus_plus"]


def kmeans_plus_plus(
    embeddings: Any, num_clusters: int, *, seed: int = 0, sample_size: int | None = None
) -> np.ndarray:
    """k-means++ seeds (Arthur, Vassilvitskii 2007) drawn from a seeded subsample.

    The first centre is uniform; each next one is a point x drawn with probability
    D(x)^2 / sum D^2, D(x) the distance to the nearest centre chosen so far. The draw runs on
    ``sample_size`` points (default min(N, max(16 k, 10000))), costing O(sample_size k D).

    Example:
        >>> kmeans_plus_plus(np.array([[0.0], [0.0], [9.0]]), 2).tolist() in ([[0.0], [9.0]],
        ...                                                                    [[9.0], [0.0]])
        True
    """
    embeddings = as_embeddings(embeddings, "embeddings")
    if not 1 <= num_clusters <= len(embeddings):
        raise ValueError(
            f"num_clusters must be between 1 and {len(embeddings)} (the number of points), "
            f"got {num_clusters}"
        )
    check_count(seed, "seed", minimum=0)
    if sample_size is not None:
        check_count(sample_size, "sample_size", minimum=num_clusters)
    rng = np.random.default_rng(seed)
    size = min(len(embeddings), sample_size or max(16 * num_clusters, 10_000))
    rows = np.arange(len(embeddings))
    if size < len(embeddings):
        rows = np.sort(rng.choice(len(embeddings), size=size, replace=False))
    points = torch.from_numpy(np.ascontiguousarray(embeddings[rows], dtype=np.float64))
    sq_norms = (points * points).sum(dim=1)
    uniforms = rng.random(num_clusters)
    chosen = [int(uniforms[0] * size)]

    def sq_distances(pick: int) -> torch.Tensor:
        return (sq_norms - 2.0 * (points @ points[pick]) + sq_norms[pick]).clamp_min_(0.0)

    nearest = sq_distances(chosen[0])
    for step in range(1, num_clusters):
        cumulative = torch.cumsum(nearest, dim=0)
        total = float(cumulative[-1])
        if total > 0:
            target = torch.tensor([uniforms[step] * total], dtype=torch.float64)
            pick = min(int(torch.searchsorted(cumulative, target, right=True)), size - 1)
        else:
            pick = int(uniforms[step] * size)
        chosen.append(pick)
        nearest = torch.minimum(nearest, sq_distances(pick))
    return points[chosen].numpy().astype(np.float32)


def kmeans(
    embeddings: Any, num_clusters: int, *, seed: int = 0, num_iterations: int = 20
) -> np.ndarray:
    """Cluster assignments of k-means (Lloyd 1982) with k-means++ seeding, seeded.

    Minimises sum_i |x_i - c_{a(i)}|^2: seeds from `kmeans_plus_plus`, then ``num_iterations``
    Lloyd iterations of faiss.Kmeans on every point (no subsampling), or scikit-learn's
    KMeans (k-means++, one run) when faiss is absent.

    Parameters:
        embeddings: (N, D) float array or tensor.
        num_clusters: k, 1 <= k <= N.
        seed: random seed of the seeding.
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
    check_count(num_iterations, "num_iterations")
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
    model.train(x, init_centroids=kmeans_plus_plus(x, num_clusters, seed=seed))
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
    _, (codes,) = encode_labels(labels)
    return kmeans_agreement(x, codes, ("nmi", "ami"), seed=seed, num_iterations=num_iterations)


def kmeans_agreement(
    x: np.ndarray,
    codes: np.ndarray,
    names: tuple[str, ...],
    *,
    seed: int = 0,
    num_iterations: int = 20,
) -> dict[str, float]:
    """The chosen of "nmi", "ami" between class codes and `kmeans` with k = number of classes.

    Both use the arithmetic mean of the entropies as normaliser (scikit-learn's
    ``average_method="arithmetic"``), pinned here so that a change of default cannot move
    them. Inputs are checked by the caller.

    Example:
        >>> x = np.array([[0.0], [0.1], [5.0], [5.1]])
        >>> kmeans_agreement(x, np.array([0, 0, 1, 1]), ("nmi",))
        {'nmi': 1.0}
    """
    assignment = kmeans(x, len(np.unique(codes)), seed=seed, num_iterations=num_iterations)
    scores = {
        "nmi": lambda: normalized_mutual_info_score(codes, assignment, average_method="arithmetic"),
        "ami": lambda: adjusted_mutual_info_score(codes, assignment, average_method="arithmetic"),
    }
    return {name: float(scores[name]()) for name in names}
