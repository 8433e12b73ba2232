"""Short training runs of the proxy and centre family: a linear embedder on clustered
Gaussian data whose class signal hides among loud nuisance features. Each loss must go down
and Recall@1 on held-out samples must rise well above the random projection's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepmetric.distances import MetricCosineDistance
from deepmetric.losses.additive_margin import (
    AdaptiveMargin,
    AdditiveMarginLoss,
    additive_margin_loss,
)
from deepmetric.losses.param_groups import param_groups
from deepmetric.losses.proxy import CenterLoss, ProxyAnchorLoss, ProxyNCALoss

NUM_CLASSES, INPUT_DIM, EMBEDDING_DIM = 8, 32, 16


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clustered(seed, per_class=30, informative=4):
    """Class means in `informative` dimensions, noise three times louder in the rest."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(NUM_CLASSES, informative, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    x = torch.randn(len(labels), INPUT_DIM, generator=g)
    x[:, informative:] *= 3
    x[:, :informative] += 2.5 * means[labels]
    return x, labels


def recall_at_1(embeddings, labels, cosine):
    """Share of samples whose nearest other sample has their label."""
    if cosine:
        unit = F.normalize(embeddings, dim=1)
        distances = -(unit @ unit.T)
    else:
        distances = torch.cdist(embeddings, embeddings)
    distances.fill_diagonal_(float("inf"))
    return (labels[distances.argmin(dim=1)] == labels).float().mean().item()


def train(loss_fn, cosine, steps=150, objective=None):
    torch.manual_seed(0)
    x_train, y_train = clustered(0)
    x_test, y_test = clustered(1)
    model = torch.nn.Linear(INPUT_DIM, EMBEDDING_DIM)
    optimizer = torch.optim.Adam(param_groups(model, loss_fn, lr=0.01, loss_lr=0.05))
    objective = objective or (lambda: loss_fn.eval()(model(x_train), y_train).item())
    with torch.no_grad():
        recall_before = recall_at_1(model(x_test), y_test, cosine)
        loss_before = objective()
    loss_fn.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x_train), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        recall_after = recall_at_1(model(x_test), y_test, cosine)
        loss_after = objective()
    return loss_before, loss_after, recall_before, recall_after


@pytest.mark.parametrize(
    ("make", "cosine"),
    [
        (lambda: ProxyNCALoss(NUM_CLASSES, EMBEDDING_DIM, softmax_scale=3.0), True),
        (
            lambda: ProxyNCALoss(
                NUM_CLASSES, EMBEDDING_DIM, softmax_scale=3.0, exclude_positive=False
            ),
            True,
        ),
        (
            lambda: ProxyNCALoss(
                NUM_CLASSES,
                EMBEDDING_DIM,
                softmax_scale=3.0,
                proxies_per_class=3,
                assignment="dynamic",
            ),
            True,
        ),
        (lambda: ProxyAnchorLoss(NUM_CLASSES, EMBEDDING_DIM), True),
        (lambda: CenterLoss(NUM_CLASSES, EMBEDDING_DIM, center_weight=0.1), False),
        (lambda: CenterLoss(NUM_CLASSES, EMBEDDING_DIM, center_weight=0.1, alpha=None), False),
        (lambda: AdditiveMarginLoss(NUM_CLASSES, EMBEDDING_DIM, margin=1.0, scale=2.0), False),
    ],
    ids=["nca", "nca-with-positive", "nca-dynamic", "anchor", "center", "center-sgd", "margin"],
)
def test_training_lowers_loss_and_raises_recall(make, cosine):
    loss_fn = make()
    loss_before, loss_after, before, after = train(loss_fn, cosine)
    # Proxy-NCA without the positive is unbounded below, so ask for a drop in both senses
    assert loss_after < min(0.5 * loss_before, loss_before - 1.0)
    assert before < 0.3
    assert after > 0.6 and after > before + 0.35


def test_adaptive_margin_training_sets_margin_to_class_diameter():
    schedule = AdaptiveMargin(update_every=25)
    loss_fn = AdditiveMarginLoss(
        NUM_CLASSES, EMBEDDING_DIM, margin=schedule, scale=8.0, distance=MetricCosineDistance()
    )
    x_train, y_train = clustered(0)
    x_test, y_test = clustered(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(INPUT_DIM, EMBEDDING_DIM)
    optimizer = torch.optim.Adam(param_groups(model, loss_fn, lr=0.01, loss_lr=0.05))

    def zero_margin_loss():
        embeddings = model(x_train)
        distance = MetricCosineDistance()
        return additive_margin_loss(
            embeddings, y_train, centers=loss_fn.centers, scale=8.0, distance=distance
        ).item()

    with torch.no_grad():
        before, loss_before = recall_at_1(model(x_test), y_test, True), zero_margin_loss()
    for _ in range(150):
        optimizer.zero_grad()
        loss_fn(model(x_train), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        after, loss_after = recall_at_1(model(x_test), y_test, True), zero_margin_loss()
    assert len(schedule.history) == 6 and schedule.history[0].step == 25
    first = schedule.history[0]
    assert first.margin == pytest.approx(2 * first.mean_center_distance)
    assert 0 < schedule.margin < 2  # a diameter on the unit sphere's metric cosine scale
    assert loss_after < 0.5 * loss_before
    assert after > 0.6 and after > before + 0.35
