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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_issue2_pair_triplet_miners import clustered  # noqa: E402
from harness import forward_only, measure, pair_floor, pk_labels  # noqa: E402

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


def contrastive(x, y):
    return losses.contrastive_loss(x, y)


def triplet(x, y):
    return losses.triplet_margin_loss(x, y, return_stats=True)[0]


def triplet_smooth(x, y):
    return losses.triplet_margin_loss(x, y, smooth_loss=True)


def lifted(x, y):
    return losses.lifted_structure_loss(x, y)


def multi_similarity(x, y):
    return losses.multi_similarity_loss(x, y)


def circle(x, y):
    return losses.circle_loss(x, y)


def ranked_list(x, y):
    return losses.ranked_list_loss(x, y)


def margin(x, y):
    return losses.margin_loss(x, y)


def ntxent(x, y):
    return losses.ntxent_loss(x, y)


def supcon(x, y):
    return losses.supcon_loss(x, y)


def npairs(x, y):
    return losses.npairs_loss(x, y)


def histogram(x, y):
    return losses.histogram_loss(x, y)


def _single(y):
    """Class ids for the miners' clustered embeddings (the first label of a multi-hot row)."""
    return y.long().argmax(dim=1) if y.dim() == 2 else y


@forward_only
def batch_hard(x, y):
    return miners.BatchHardMiner()(clustered(x, _single(y)), y)


@forward_only
def hardnet(x, y):
    return miners.HardNetMiner()(clustered(x, _single(y)), y)


@forward_only
def semihard(x, y):
    return miners.TripletMarginMiner(0.2, "semihard")(clustered(x, _single(y)), y)


@forward_only
def distance_weighted(x, y):
    generator = torch.Generator().manual_seed(0)
    return miners.DistanceWeightedMiner(generator=generator)(clustered(x, _single(y)), y)


@forward_only
def rank_window(x, y):
    generator = torch.Generator().manual_seed(0)
    miner = miners.RankWindowMiner(window=(101, 500), generator=generator)
    return miner(clustered(x, _single(y)), y)


@forward_only
def pair_margin(x, y):
    return miners.PairMarginMiner()(clustered(x, _single(y)), y)


@forward_only
def ms_miner(x, y):
    return miners.MultiSimilarityMiner()(clustered(x, _single(y)), y)


CASES = {
    "contrastive": contrastive,
    "triplet (all, hinge, stats)": triplet,
    "triplet (all, soft-plus)": triplet_smooth,
    "lifted structure": lifted,
    "multi-similarity": multi_similarity,
    "circle": circle,
    "ranked list": ranked_list,
    "margin": margin,
    "NT-Xent": ntxent,
    "SupCon": supcon,
    "N-pairs": npairs,
    "histogram": histogram,
    "miner: batch-hard [fwd]": batch_hard,
    "miner: HardNet [fwd]": hardnet,
    "miner: semihard [fwd]": semihard,
    "miner: distance-weighted [fwd]": distance_weighted,
    "miner: rank window [fwd]": rank_window,
    "miner: pair margin [fwd]": pair_margin,
    "miner: multi-similarity [fwd]": ms_miner,
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
