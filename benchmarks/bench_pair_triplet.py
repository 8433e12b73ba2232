"""Forward+backward time and peak memory of the pair and triplet losses vs the pair floor.

.venv/bin/python benchmarks/bench_pair_triplet.py --sizes 256 1024 4096 16384
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import main  # noqa: E402

from deepmetric import losses  # noqa: E402


def contrastive(x, y):
    return losses.contrastive_loss(x, y)


def triplet_all(x, y):
    return losses.triplet_margin_loss(x, y)


def triplet_all_stats(x, y):
    return losses.triplet_margin_loss(x, y, return_stats=True)[0]


def triplet_smooth(x, y):
    return losses.triplet_margin_loss(x, y, smooth_loss=True)


CASES = {
    "contrastive": contrastive,
    "triplet (all, hinge)": triplet_all,
    "triplet (all, hinge, stats)": triplet_all_stats,
    "triplet (all, soft-plus)": triplet_smooth,
}

if __name__ == "__main__":
    main(CASES, [256, 1024, 4096])
