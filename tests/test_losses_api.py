"""The public surface of deepmetric.losses: every stats record is importable from it,
DeepClusteringLoss keeps the stats of its last call like the other losses, and every module
is built from its checked function (constructor, default distance, checks, repr)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import pytest
import torch

import deepmetric.losses as losses
from deepmetric.distances import CosineSimilarity
from deepmetric.losses.classifier import ClassifierLoss


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


# ---------------------------------------------------------------------------------------------
# Modules are built from their functions (deepmetric.losses.base.checked and MetricLoss)


def _module_classes():
    return sorted(
        (
            value
            for value in vars(losses).values()
            if isinstance(value, type)
            and issubclass(value, losses.MetricLoss)
            and "function" in vars(value)
            and value not in (losses.MetricLoss, ClassifierLoss)
        ),
        key=lambda cls: cls.__name__,
    )


MODULES = _module_classes()


def test_every_loss_module_names_a_checked_function():
    assert len(MODULES) >= 20
    for cls in MODULES:
        assert hasattr(cls.function, "checks"), f"{cls.__name__}.function is not @checked"


@pytest.mark.parametrize("cls", MODULES, ids=lambda cls: cls.__name__)
def test_generated_constructor_takes_the_function_keywords_and_defaults(cls):
    if not getattr(cls.__init__, "generated", False):
        pytest.skip(f"{cls.__name__} writes its own constructor")
    constructor = inspect.signature(cls).parameters
    function = inspect.signature(cls.function).parameters
    leading = ["num_classes", "embedding_size"] if issubclass(cls, ClassifierLoss) else []
    names = [*leading, *cls.function.checks, "distance"]
    if "reduction" in function:
        names.append("reduction")
    assert list(constructor) == names
    for name in names[len(leading) :]:
        assert constructor[name].default == function[name].default, name


@pytest.mark.parametrize("cls", MODULES, ids=lambda cls: cls.__name__)
def test_module_default_distance_is_the_function_default(cls):
    args = (3, 4) if issubclass(cls, ClassifierLoss) else ()
    module = cls(*args)
    assert cls.function.distances is not None
    assert type(module.distance) is type(cls.function.distances.default())


def test_joint_checks_run_at_construction_and_at_each_call():
    with pytest.raises(ValueError, match="pos_margin"):
        losses.ContrastiveLoss(pos_margin=2.0, neg_margin=1.0)
    with pytest.raises(ValueError, match="similarity"):
        losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8, distance=CosineSimilarity())
    module = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)
    module.pos_margin = 3.0  # each value is fine alone; the pair is checked at the call
    x, y = torch.randn(4, 2), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="pos_margin"):
        module(x, y)
    with pytest.raises(ValueError, match="reduction"):
        losses.DeepClusteringLoss(reduction="nonzero_mean")


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: losses.TripletMarginLoss(swap=1), "swap"),
        (lambda: losses.TripletMarginLoss(smooth_loss="yes"), "smooth_loss"),
        (lambda: losses.LiftedStructureLoss(smooth=None), "smooth"),
        (lambda: losses.SupConLoss(weight_positives=0), "weight_positives"),
        (lambda: losses.HistogramLoss(value_range=(1.0,)), "value_range"),
        (lambda: losses.HistogramLoss(value_range=(1.0, float("nan"))), "value_range"),
        (lambda: losses.MarginLoss(num_classes=0), "num_classes"),
    ],
)
def test_flags_and_structured_hyper_parameters_are_checked(build, name):
    with pytest.raises((TypeError, ValueError), match=name):
        build()


def test_losses_without_a_reduction_take_none():
    for cls in (losses.HistogramLoss, losses.FacilityLocationLoss):
        assert "reduction" not in inspect.signature(cls).parameters
        assert not cls.has_reduction


def test_ranked_list_alpha_defaults_to_one_plus_half_the_margin_at_each_call():
    x = torch.nn.functional.normalize(torch.randn(8, 4, dtype=torch.float64))
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    module = losses.RankedListLoss(margin=0.4)
    assert module.alpha is None
    module.margin = 0.6
    torch.testing.assert_close(module(x, y), losses.ranked_list_loss(x, y, margin=0.6, alpha=1.3))


def test_repr_lists_the_hyper_parameters():
    text = repr(losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9))
    assert text.startswith("ContrastiveLoss(\n  pos_margin=0.1, neg_margin=0.9, power=1.0\n")


def test_a_module_of_an_unchecked_function_is_refused_at_definition():
    def plain_loss(embeddings, labels=None, *, margin=0.1, distance=None, reduction="mean"):
        return embeddings.sum() * margin

    with pytest.raises(TypeError, match="@checked"):

        class PlainLoss(losses.MetricLoss):  # the hyper-parameters would not be passed
            function = staticmethod(plain_loss)
