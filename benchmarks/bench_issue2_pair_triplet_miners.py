"""Issue 2 benchmark: pair and triplet losses and the miners, as multiples of the pair floor.

    .venv/bin/python benchmarks/bench_issue2_pair_triplet_miners.py --sizes 256 1024 4096
    .venv/bin/python benchmarks/bench_issue2_pair_triplet_miners.py --sizes 16384 --repeats 1

Losses are timed forward+backward on the harness's batch (N x 128 standard normal, P x K
labels with K = 8). Miners are timed on their forward alone (they run without gradients) and
on embeddings with class structure (`clustered`): on unstructured random embeddings about
half of all N^2 K triplets are hard, so hard or semi-hard mining returns O(N^2 K) index
tuples (1.4 GB of them at N = 4096) and would measure the size of its output rather than
the mining. AllPairsMiner and AllTripletsMiner only enumerate and are not benchmarked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from harness import forward_only, main  # noqa: E402

from deepmetric import losses, miners  # noqa: E402

CLASS_SPREAD = 1.1


def clustered(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unit embeddings around one random centre per class, like those of a trained model.

    normalize(centre[label] + CLASS_SPREAD * x / sqrt(D)): positives lie at about 1.05 from
    each other, negatives at about 1.41, so that at margin 0.2 about 3% of the triplets are
    semi-hard and almost none hard. O(N D), negligible next to the N x N work.
    """
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(int(labels.max()) + 1, x.shape[1], generator=generator)
    centres = F.normalize(centres, dim=1)
    return F.normalize(centres[labels] + CLASS_SPREAD * x.detach() / x.shape[1] ** 0.5, dim=1)


def contrastive(x, y):
    return losses.contrastive_loss(x, y)


def contrastive_stats(x, y):
    return losses.ContrastiveLoss()(x, y)


def contrastive_nonzero_mean(x, y):
    return losses.contrastive_loss(x, y, reduction="nonzero_mean")


def triplet_batch_hard(x, y):
    return losses.triplet_margin_loss(x, y, miners.BatchHardMiner()(x, y))


def contrastive_pair_margin(x, y):
    return losses.contrastive_loss(x, y, miners.PairMarginMiner()(x, y))


def triplet_all(x, y):
    return losses.triplet_margin_loss(x, y)


def triplet_all_stats(x, y):
    return losses.triplet_margin_loss(x, y, return_stats=True)[0]


def triplet_smooth(x, y):
    return losses.triplet_margin_loss(x, y, smooth_loss=True)


def triplet_swap(x, y):
    return losses.triplet_margin_loss(x, y, swap=True)


@forward_only
def batch_hard(x, y):
    return miners.BatchHardMiner()(clustered(x, y), y)


@forward_only
def hardnet(x, y):
    return miners.HardNetMiner()(clustered(x, y), y)


@forward_only
def semihard(x, y):
    return miners.TripletMarginMiner(0.2, "semihard")(clustered(x, y), y)


@forward_only
def hard(x, y):
    return miners.TripletMarginMiner(0.2, "hard")(clustered(x, y), y)


@forward_only
def distance_weighted(x, y):
    generator = torch.Generator().manual_seed(0)
    return miners.DistanceWeightedMiner(generator=generator)(clustered(x, y), y)


@forward_only
def rank_window(x, y):
    generator = torch.Generator().manual_seed(0)
    return miners.RankWindowMiner(window=(101, 500), generator=generator)(clustered(x, y), y)


@forward_only
def pair_margin(x, y):
    return miners.PairMarginMiner()(clustered(x, y), y)


CASES = {
    "contrastive": contrastive,
    "contrastive (module, stats)": contrastive_stats,
    "contrastive (nonzero_mean)": contrastive_nonzero_mean,
    "triplet + batch-hard miner": triplet_batch_hard,
    "contrastive + pair-margin miner": contrastive_pair_margin,
    "triplet (all, hinge)": triplet_all,
    "triplet (all, hinge, stats)": triplet_all_stats,
    "triplet (all, soft-plus)": triplet_smooth,
    "triplet (all, hinge, anchor swap)": triplet_swap,
    "miner: batch-hard [fwd]": batch_hard,
    "miner: HardNet [fwd]": hardnet,
    "miner: triplet margin, semihard [fwd]": semihard,
    "miner: triplet margin, hard [fwd]": hard,
    "miner: distance-weighted [fwd]": distance_weighted,
    "miner: rank window (101, 500) [fwd]": rank_window,
    "miner: pair margin [fwd]": pair_margin,
}

if __name__ == "__main__":
    main(CASES, [256, 1024, 4096])
