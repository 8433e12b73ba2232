"""Short training runs of the softmax-classifier family: a linear embedder on clustered
Gaussian data whose class signal hides among loud nuisance features. Each loss must go down
and Recall@1 on held-out samples must rise well above the random projection's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepmetric.losses.param_groups import param_groups
from deepmetric.losses.softmax import (
    ArcFaceLoss,
    CosFaceLoss,
    HeatedUpSoftmaxLoss,
    LambdaSchedule,
    LargeMarginSoftmaxLoss,
    NormalizedSoftmaxLoss,
    SphereFaceLoss,
)

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


def recall_at_1(embeddings, labels):
    """Share of samples whose nearest other sample (cosine) has their label."""
    unit = F.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    return (labels[similarity.argmax(dim=1)] == labels).float().mean().item()


def train(loss_fn, steps=150, step_schedule=None):
    torch.manual_seed(0)
    x_train, y_train = clustered(0)
    x_test, y_test = clustered(1)
    model = torch.nn.Linear(INPUT_DIM, EMBEDDING_DIM)
    optimizer = torch.optim.Adam(param_groups(model, loss_fn, lr=0.01, loss_lr=0.05))
    with torch.no_grad():
        recall_before = recall_at_1(model(x_test), y_test)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(x_train), y_train)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step_schedule is not None:
            step_schedule(loss_fn)
    with torch.no_grad():
        recall_after = recall_at_1(model(x_test), y_test)
    return losses, recall_before, recall_after


@pytest.mark.parametrize(
    "make",
    [
        lambda: NormalizedSoftmaxLoss(NUM_CLASSES, EMBEDDING_DIM, temperature=0.1),
        lambda: CosFaceLoss(NUM_CLASSES, EMBEDDING_DIM, margin=0.35, scale=16.0),
        lambda: ArcFaceLoss(NUM_CLASSES, EMBEDDING_DIM, margin=0.5, scale=16.0),
        lambda: ArcFaceLoss(NUM_CLASSES, EMBEDDING_DIM, margin=0.5, scale=16.0, easy_margin=True),
        lambda: SphereFaceLoss(NUM_CLASSES, EMBEDDING_DIM, margin=4),
        lambda: LargeMarginSoftmaxLoss(
            NUM_CLASSES, EMBEDDING_DIM, margin=2, lambda_schedule=LambdaSchedule(base=100.0)
        ),
    ],
    ids=["normalized", "cosface", "arcface", "arcface-easy", "sphereface", "l-softmax"],
)
def test_training_lowers_loss_and_raises_recall(make):
    loss_fn = make()
    losses, before, after = train(loss_fn)
    # the annealed losses change their objective as lambda falls, so compare the late
    # losses with the early ones rather than the first with the last
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert before < 0.3
    assert after > 0.6 and after > before + 0.35


def test_heated_up_softmax_trains_through_its_schedule():
    loss_fn = HeatedUpSoftmaxLoss(
        NUM_CLASSES, EMBEDDING_DIM, heat_up_at=100, initial_scale=16.0, final_scale=4.0
    )
    losses, before, after = train(loss_fn, step_schedule=lambda fn: fn.step())
    assert loss_fn.scale == 4.0 and loss_fn.num_steps == 150
    assert sum(losses[90:100]) < 0.5 * sum(losses[:10])
    assert after > 0.6 and after > before + 0.35
