"""The public surface of deepmetric.losses: every stats record is importable from it, and
DeepClusteringLoss keeps the stats of its last call like the other losses."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import pytest
import torch

import deepmetric.losses as losses
from deepmetric.distances import CosineSimilarity


def test_every_stats_record_is_exported():
    found = set()
    for info in pkgutil.iter_modules(losses.__path__, "deepmetric.losses."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                name.endswith("Stats")
                and dataclasses.is_dataclass(value)
                and value.__module__ == info.name
            ):
                found.add(name)
    assert {"ClassifierStats", "ProxyAnchorStats", "DeepClusteringStats"} <= found
    assert sorted(found - set(losses.__all__)) == []
    for name in found:
        assert hasattr(losses, name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_clustering_stats(reduction):
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    r, ry = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 3])
    loss, stats = losses.deep_clustering_loss(
        x, y, ref_emb=r, ref_labels=ry, reduction=reduction, return_stats=True
    )
    # ||V R^T - Y Y_r^T||_F^2 formed explicitly (small sizes only)
    residual = x @ r.T - (y[:, None] == ry[None, :]).double()
    torch.testing.assert_close(stats.loss_sum, residual.pow(2).sum())
    assert stats.normaliser == (24 if reduction == "mean" else 1)
    torch.testing.assert_close(loss, stats.loss_sum / stats.normaliser)
    assert stats.loss_sum.requires_grad

    module = losses.DeepClusteringLoss(distance=CosineSimilarity(), reduction=reduction)
    assert module.stats is None
    value = module(x, y)
    expected, expected_stats = losses.deep_clustering_loss(
        x, y, distance=CosineSimilarity(), reduction=reduction, return_stats=True
    )
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(module.stats.loss_sum, expected_stats.loss_sum)
    assert module.stats.normaliser == expected_stats.normaliser
