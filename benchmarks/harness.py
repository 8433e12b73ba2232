"""Shared benchmark harness: time and peak memory of forward+backward, as multiples of a floor.

Each case runs in a fresh process (so the peak resident memory belongs to it alone) with one
thread. Time is process CPU seconds (`time.process_time`), the median of repeats. Memory is
the peak resident set size during one forward+backward minus the resident size just before
it ("extra"), read from the kernel's high-water mark (VmHWM, reset through
/proc/self/clear_refs where allowed, else taken from a fresh process).

A case is a function `(embeddings, labels) -> loss`; the harness calls `.backward()` on what
it returns. Cases marked with `forward_only` (miners, whose output is index tuples) are timed
on the call alone.

The "pair floor" is the cheapest thing a pair-based loss can do: normalise, one N x N
matmul, mean, backward. Every figure is reported as a ratio to the floor measured in the
same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

Case = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def forward_only(case: Case) -> Case:
    """Mark a case whose cost is its forward call (a miner): no backward is run."""
    case.forward_only = True
    return case


def pair_floor(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Normalise, one N x N similarity matmul, mean: the floor of any pair-based loss."""
    unit = F.normalize(embeddings, dim=1)
    return (unit @ unit.T).mean()


def pk_labels(n: int, per_class: int = 8) -> torch.Tensor:
    """Labels of a P x K batch: n // per_class classes of per_class items each."""
    return torch.arange(n) // per_class


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def start_peak_memory() -> int:
    """Reset the process's peak resident memory (where /proc/self/clear_refs allows) and
    return the resident memory now, in KiB: the baseline of `peak_memory_mib`."""
    before = _rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    return before


def peak_memory_mib(before: int) -> float:
    """Peak resident memory since `start_peak_memory` returned ``before``, above it, in MiB."""
    return max(_rss_kb("VmHWM") - before, 0) / 1024


def _run(case: Case, x: torch.Tensor, labels: torch.Tensor) -> None:
    if getattr(case, "forward_only", False):
        case(x, labels)
    else:
        case(x, labels).backward()


def _child(case: Case, n: int, dim: int, repeats: int, queue: mp.Queue, layout=None) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    embeddings = torch.randn(n, dim)
    labels = (layout or pk_labels)(n)
    warm = embeddings[:64].clone().requires_grad_()
    _run(case, warm, labels[:64])
    x = embeddings.clone().requires_grad_()
    before = start_peak_memory()
    _run(case, x, labels)
    peak = peak_memory_mib(before)
    times = []
    for _ in range(repeats):
        x.grad = None
        start = time.process_time()
        _run(case, x, labels)
        times.append(time.process_time() - start)
    queue.put((statistics.median(times), peak))


def measure(
    case: Case,
    n: int,
    dim: int = 128,
    repeats: int = 3,
    timeout: float = 300,
    layout: Callable[[int], torch.Tensor] | None = None,
):
    """(median CPU seconds, peak extra MiB) of case forward+backward (forward alone for a
    `forward_only` case), or None on timeout/crash. `layout(n)` gives the labels (default
    `pk_labels`); it must be a module-level function (it is sent to a fresh process)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(case, n, dim, repeats, queue, layout))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        return None
    return None if queue.empty() else queue.get()


def run_table(cases: dict[str, Case], sizes: list[int], dim: int = 128, repeats: int = 3) -> str:
    """Markdown table of every case at every size, with ratios to the pair floor."""
    rows = ["| case | N | CPU s | x floor | extra MiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for n in sizes:
        floor = measure(pair_floor, n, dim, repeats)
        floor_time = floor[0] if floor else float("nan")
        rows.append(_row("pair floor", n, floor, floor_time))
        print(rows[-1], flush=True)
        for name, case in cases.items():
            rows.append(_row(name, n, measure(case, n, dim, repeats), floor_time))
            print(rows[-1], flush=True)
    return "\n".join(rows)


def _row(name: str, n: int, result, floor_time: float) -> str:
    if result is None:
        return f"| {name} | {n} | did not finish | | |"
    seconds, extra = result
    return f"| {name} | {n} | {seconds:.4f} | {seconds / floor_time:.2f} | {extra:.0f} |"


def main(cases: dict[str, Case], default_sizes: list[int]) -> None:
    """Command line shared by the benchmark scripts: --sizes, --dim, --repeats, --only."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=default_sizes)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", help="case names to run")
    args = parser.parse_args()
    chosen = {k: v for k, v in cases.items() if not args.only or k in args.only}
    print(run_table(chosen, args.sizes, args.dim, args.repeats))
