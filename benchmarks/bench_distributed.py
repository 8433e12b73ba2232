"""Distributed training steps: 1, 2 and 4 processes on the same global batch, per mode.

    .venv/bin/python benchmarks/bench_distributed.py --batch 1024 --worlds 1 2 4

One step = the model's forward on this rank's rows, `DistributedLoss` (gather with
gradients, the loss, its backward), DDP's gradient averaging and an SGD step. The model is
one Linear layer (features -> --dim), so the figures are those of the loss and the
communication. Each configuration runs in fresh processes (gloo on 127.0.0.1), one thread
each. Reported per step:

- CPU s per rank: process CPU seconds of the slowest rank (median of --repeats steps);
- CPU s, all ranks: the sum over ranks (replicated mode repeats the loss on every rank);
- x 1 process: the slowest rank's CPU time as a multiple of one process on the whole batch;
- extra MiB: the slowest rank's peak resident memory during the steps minus before them;
- payload KiB sent: bytes this rank hands to collectives per step (the gathers, labels,
  normalisers, the miner's random state, and DDP's gradient all-reduce of the model);
  a ring all-gather or all-reduce puts about (W - 1) / W, respectively 2 (W - 1) / W, of
  the collective's full tensor on each rank's link.

Wall-clock time is left out: on a shared CPU it measures the neighbours, not this code.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))

from harness import peak_memory_mib, start_peak_memory  # noqa: E402

from deepmetric import distributed, losses  # noqa: E402

LOSSES = {
    "contrastive": lambda: losses.ContrastiveLoss(neg_margin=1.0),
    "triplet (all)": lambda: losses.TripletMarginLoss(margin=0.2),
    "multi-similarity": lambda: losses.MultiSimilarityLoss(),
}
FEATURES = 64


def _count_bytes(counter: list) -> None:
    """Wrap the collectives deepmetric calls so each adds its payload bytes to counter[0]."""

    def counting(function, position=1):
        def wrapped(*args, **kwargs):
            tensor = args[position] if len(args) > position else next(iter(kwargs.values()))
            counter[0] += tensor.numel() * tensor.element_size()
            return function(*args, **kwargs)

        return wrapped

    distributed._all_gather_single = counting(distributed._all_gather_single)
    distributed._reduce_scatter_single = counting(distributed._reduce_scatter_single)
    dist.all_reduce = counting(dist.all_reduce, 0)
    dist.broadcast = counting(dist.broadcast, 0)


def _rank(rank, world, port, name, mode, batch, dim, repeats, queue):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=600),
        )
    counter = [0]
    _count_bytes(counter)
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, dim)
    runner = DistributedDataParallel(model) if world > 1 else model
    loss_fn = distributed.DistributedLoss(LOSSES[name](), mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs = torch.randn(batch, FEATURES)
    labels = torch.arange(batch) // 8  # P x K with K = 8
    rows = torch.tensor_split(torch.arange(batch), world)[rank]

    def step():
        optimizer.zero_grad()
        loss_fn(runner(inputs[rows]), labels[rows]).backward()
        optimizer.step()

    step()  # warm-up
    before = start_peak_memory()
    counter[0] = 0
    times = []
    for _ in range(repeats):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    sent = counter[0] / repeats
    if world > 1:  # DDP's all-reduce of the model's gradients (C++, not counted above)
        sent += sum(p.numel() * p.element_size() for p in model.parameters())
    queue.put((rank, statistics.median(times), peak_memory_mib(before), sent))
    if world > 1:
        dist.destroy_process_group()


def measure(name, mode, world, batch, dim, repeats, timeout=900):
    """(slowest rank CPU s, sum of ranks' CPU s, slowest rank extra MiB, payload bytes)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [
        context.Process(target=_rank, args=(r, world, port, name, mode, batch, dim, repeats, queue))
        for r in range(world)
    ]
    for process in processes:
        process.start()
    results = []
    deadline = time.monotonic() + timeout
    for _ in processes:
        results.append(queue.get(timeout=max(1.0, deadline - time.monotonic())))
    for process in processes:
        process.join(max(1.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
    seconds = [r[1] for r in results]
    return max(seconds), sum(seconds), max(r[2] for r in results), max(r[3] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="global batch (rows)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", help="loss names to run")
    args = parser.parse_args()
    print(f"global batch {args.batch} x {args.dim}, P x K with K = 8, one thread per process")
    print(
        "| loss | mode | processes | CPU s per rank | CPU s, all ranks | x 1 process "
        "| extra MiB | payload KiB sent |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in LOSSES:
        if args.only and name not in args.only:
            continue
        base = None
        for mode in distributed.MODES:
            try:
                distributed.check_mode(LOSSES[name](), mode)
            except ValueError as error:
                print(f"| {name} | {mode} | | refused: {error} | | | | |")
                continue
            for world in args.worlds:
                slowest, total, extra, sent = measure(
                    name, mode, world, args.batch, args.dim, args.repeats
                )
                base = slowest if base is None and world == 1 else base
                print(
                    f"| {name} | {mode} | {world} | {slowest:.4f} | {total:.4f} | "
                    f"{slowest / base:.2f} | {extra:.1f} | {sent / 1024:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
