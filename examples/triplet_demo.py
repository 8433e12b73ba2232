"""Train a small embedder with the triplet loss on synthetic clustered data.

Open-set, as in metric learning benchmarks: the model trains on half of the classes and is
evaluated on the other half, which it has never seen. Prints Recall@1 before and after.

    python examples/triplet_demo.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepmetric.distances import EuclideanDistance
from deepmetric.losses import TripletMarginLoss
from deepmetric.miners import TripletMarginMiner
from deepmetric.samplers import PKBatchSampler


def clustered_data(num_classes: int, per_class: int, dim: int, seed: int):
    """Classes are Gaussian blobs in a low-dimensional subspace, buried in noisy dimensions."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, 8, generator=g) * 1.5
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    signal = centres[labels] + 0.5 * torch.randn(len(labels), 8, generator=g)
    mixing = torch.randn(8, dim, generator=g)
    noise = 4.0 * torch.randn(len(labels), dim, generator=g)
    return signal @ mixing + noise, labels


def recall_at_1(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of items whose nearest other item has the same label."""
    d = EuclideanDistance()(embeddings).fill_diagonal_(float("inf"))
    return (labels[d.argmin(dim=1)] == labels).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    x, y = clustered_data(num_classes=60, per_class=40, dim=64, seed=0)
    train, test = y < 30, y >= 30
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    loss_fn = TripletMarginLoss(margin=0.2)
    miner = TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = PKBatchSampler(y[train].numpy(), classes_per_batch=8, samples_per_class=8)
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_sampler=sampler)

    with torch.no_grad():
        print(f"test Recall@1 before training: {recall_at_1(model(x[test]), y[test]):.3f}")
    for epoch in range(8):
        for inputs, labels in loader:
            embeddings = nn.functional.normalize(model(inputs), dim=1)
            loss = loss_fn(embeddings, labels, miner(embeddings, labels))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(
            f"epoch {epoch + 1}: loss {loss.item():.4f}, "
            f"mined semi-hard triplets {int(loss_fn.stats.num_triplets)}"
        )
    with torch.no_grad():
        print(f"test Recall@1 after training:  {recall_at_1(model(x[test]), y[test]):.3f}")


if __name__ == "__main__":
    main()
