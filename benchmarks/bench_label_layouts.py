"""Every pair, triplet and structured loss and every miner on 4,096 rows, whatever the labels.

    .venv/bin/python benchmarks/bench_label_layouts.py --sizes 4096
    .venv/bin/python benchmarks/bench_label_layouts.py --sizes 4096 --layouts "one class"

Label layouts: P x K with K = 8 (the usual batch), one class (no negatives), two classes
(half the batch each), a long tail (Zipf sizes over 256 classes: the largest holds about a
sixth of the batch), and a multi-hot layout (each row carries 1 to 3 of 64 labels).
Each case runs in a fresh process with one thread (see `harness`): CPU seconds of
forward+backward (forward alone for miners) and the peak extra resident memory, with the
pair floor of the same run. A case that does not finish within `--timeout` seconds is
reported as such.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_issue2_pair_triplet_miners import clustered  # noqa: E402
from harness import measure, pair_floor, pk_labels  # noqa: E402

from deepmetric import losses, miners  # noqa: E402


def one_class(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def two_classes(n: int) -> torch.Tensor:
    return torch.arange(n) * 2 // n


def long_tail(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, 257, dtype=torch.float64)
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def multi_hot(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    hot = torch.rand(n, 64, generator=generator) < 2 / 64
    hot[torch.arange(n), torch.randint(0, 64, (n,), generator=generator)] = True
    return hot


LAYOUTS = {
    "P x K (K = 8)": pk_labels,
    "one class": one_class,
    "two classes": two_classes,
    "long tail": long_tail,
    "multi-hot": multi_hot,
}


def _loss(function, options, x, y):
    """`function(x, y, **options)`, the loss alone when it comes with its stats."""
    loss = function(x, y, **options)
    return loss[0] if isinstance(loss, tuple) else loss


def loss_case(function, **options):
    """A case that calls the loss `function` with `options` (a picklable partial: each case
    runs in a spawned process)."""
    return partial(_loss, function, options)


def _single(y):
    """Class ids for the miners' clustered embeddings (the first label of a multi-hot row)."""
    return y.long().argmax(dim=1) if y.dim() == 2 else y


class MinerCase:
    """A forward-only case that mines the clustered embeddings with `miner_class(**options)`
    (and a generator seeded with 0 when `seeded`); an instance, not a function, so that it
    reaches the spawned process with its `forward_only` mark."""

    forward_only = True

    def __init__(self, miner_class, seeded: bool = False, **options) -> None:
        self.miner_class, self.seeded, self.options = miner_class, seeded, options

    def __call__(self, x, y):
        options = self.options
        if self.seeded:
            options = {**options, "generator": torch.Generator().manual_seed(0)}
        return self.miner_class(**options)(clustered(x, _single(y)), y)


CASES = {
    "contrastive": loss_case(losses.contrastive_loss),
    "triplet (all, hinge, stats)": loss_case(losses.triplet_margin_loss, return_stats=True),
    "triplet (all, soft-plus)": loss_case(losses.triplet_margin_loss, smooth_loss=True),
    "lifted structure": loss_case(losses.lifted_structure_loss),
    "multi-similarity": loss_case(losses.multi_similarity_loss),
    "circle": loss_case(losses.circle_loss),
    "ranked list": loss_case(losses.ranked_list_loss),
    "margin": loss_case(losses.margin_loss),
    "NT-Xent": loss_case(losses.ntxent_loss),
    "SupCon": loss_case(losses.supcon_loss),
    "N-pairs": loss_case(losses.npairs_loss),
    "histogram": loss_case(losses.histogram_loss),
    "miner: batch-hard [fwd]": MinerCase(miners.BatchHardMiner),
    "miner: HardNet [fwd]": MinerCase(miners.HardNetMiner),
    "miner: semihard [fwd]": MinerCase(
        miners.TripletMarginMiner, margin=0.2, type_of_triplets="semihard"
    ),
    "miner: distance-weighted [fwd]": MinerCase(miners.DistanceWeightedMiner, seeded=True),
    "miner: rank window [fwd]": MinerCase(miners.RankWindowMiner, seeded=True, window=(101, 500)),
    "miner: pair margin [fwd]": MinerCase(miners.PairMarginMiner),
    "miner: multi-similarity [fwd]": MinerCase(miners.MultiSimilarityMiner),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument("--only", nargs="+", help="case names to run")
    args = parser.parse_args()
    cases = {k: v for k, v in CASES.items() if not args.only or k in args.only}
    print("| layout | case | N | CPU s | x floor | extra MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for n in args.sizes:
        floor = measure(pair_floor, n, args.dim, args.repeats)
        print(f"| | pair floor | {n} | {floor[0]:.3f} | 1.00 | {floor[1]:.0f} |", flush=True)
        for layout in args.layouts:
            for name, case in cases.items():
                result = measure(case, n, args.dim, args.repeats, args.timeout, LAYOUTS[layout])
                if result is None:
                    print(f"| {layout} | {name} | {n} | did not finish | | |", flush=True)
                    continue
                seconds, extra = result
                ratio = seconds / floor[0]
                print(
                    f"| {layout} | {name} | {n} | {seconds:.3f} | {ratio:.2f} | {extra:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
