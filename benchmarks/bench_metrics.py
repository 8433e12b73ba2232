"""Benchmark: evaluation cost against the bare exact k-NN search it cannot avoid.

For N in --sizes, synthetic clustered float32 embeddings (class sizes uniform in
[--min-class, --max-class], centres N(0, I), samples centre + noise * N(0, I)) are measured
three ways:

    (a) bare: faiss.IndexFlatL2 + one search with k = the largest number R of relevant
        references of a query (the floor: all that MAP@R needs);
    (b) retrieval: deepmetric.metrics.evaluate with Recall@1/2/4/8, Precision@1, R-Precision,
        MAP@R, MRR (and k-NN accuracy for single labels);
    (c) clustering: evaluate with NMI and AMI (k-means++ seeds, 20 faiss Lloyd iterations);
        single labels only.

With --labels multi the labels are (N, C) multi-hot rows: each item keeps its class and, with
probability --extra-rate, one more label drawn uniformly from the C classes; a reference is
relevant to a query when they share a label.

Time is process CPU seconds (time.process_time) with --threads threads (default 1, for torch
and faiss). (a) and (b) alternate --repeats times in one process (after a small warm-up), and
the ratio reported is the median of the per-repeat ratios (b)/(a), so that a noisy machine
slows both alike. Memory: each phase runs once more in a fresh process whose peak resident
set (ru_maxrss) is reported, Python, torch, faiss and the data included, and in brackets the
growth over the peak after the data was built. (c) is timed in that run.

    python benchmarks/bench_metrics.py                      # 10k, 50k, 100k x 128
    python benchmarks/bench_metrics.py --sizes 10000 50000 --labels multi
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

RETRIEVAL = ("recall@k", "precision@1", "r_precision", "map@r", "mrr", "knn_accuracy")


def make_data(size: int, dim: int, min_class: int, max_class: int, noise: float, seed: int):
    """Clustered float32 embeddings and int64 labels; class sizes uniform in the range."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < size:
        sizes.append(int(rng.integers(min_class, max_class + 1)))
    sizes[-1] -= sum(sizes) - size
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = rng.standard_normal((len(sizes), dim), dtype=np.float32)
    noise_draw = rng.standard_normal((size, dim), dtype=np.float32)
    return centres[labels] + np.float32(noise) * noise_draw, labels


def multi_hot(labels: np.ndarray, extra_rate: float, seed: int) -> np.ndarray:
    """(N, C) boolean rows: the class of each item and, with probability extra_rate, one more."""
    rng = np.random.default_rng(seed + 1)
    rows = np.zeros((len(labels), int(labels.max()) + 1), dtype=bool)
    rows[np.arange(len(labels)), labels] = True
    extra = np.flatnonzero(rng.random(len(labels)) < extra_rate)
    rows[extra, rng.integers(0, rows.shape[1], size=len(extra))] = True
    return rows


def largest_relevant(labels: np.ndarray) -> int:
    """max_i R_i with the query itself left out: the class size, or the label-sharing count."""
    if labels.ndim == 1:
        return int(np.bincount(labels).max()) - 1
    from scipy import sparse

    rows = sparse.csr_matrix(labels.astype(np.float32))
    largest = 0
    for start in range(0, rows.shape[0], 2048):
        shared = rows[start : start + 2048] @ rows.T
        largest = max(largest, int(shared.getnnz(axis=1).max()) - 1)
    return largest


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(args: argparse.Namespace, size: int):
    """Import the libraries, set threads, build the data; return (phases, x, labels)."""
    import faiss
    import torch

    from deepmetric.metrics import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    x, labels = make_data(size, args.dim, args.min_class, args.max_class, args.noise, args.seed)
    if args.labels == "multi":
        labels = multi_hot(labels, args.extra_rate, args.seed)
    depth = largest_relevant(labels) + 1  # + the query itself
    retrieval = RETRIEVAL if args.labels == "single" else RETRIEVAL[:-1]

    def bare() -> dict:
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        index.search(x, depth)
        return {}

    phases = {
        "bare": bare,
        "retrieval": lambda: evaluate(x, labels, metrics=retrieval, k=(1, 2, 4, 8)),
        "clustering": lambda: evaluate(x, labels, metrics=("nmi", "ami")),
    }
    return phases, x, labels, depth


def timed(phase) -> tuple[float, dict]:
    start = time.process_time()
    values = phase()
    return time.process_time() - start, values


def worker(args: argparse.Namespace) -> None:
    """Print one JSON line: either one phase run once in this fresh process (its time and
    peak RSS), or the alternating timing of bare search and retrieval (--worker timing)."""
    phases, x, labels, depth = setup(args, args.worker_size)
    record = {
        "phase": args.worker,
        "size": args.worker_size,
        "classes": int(labels.max()) + 1 if labels.ndim == 1 else labels.shape[1],
        "depth": depth,
        "baseline_rss_mib": peak_rss_mib(),
    }
    if args.worker == "timing":
        warm_x, warm_labels = make_data(2000, args.dim, 5, 15, args.noise, args.seed)
        from deepmetric.metrics import evaluate

        if args.labels == "multi":
            warm_labels = multi_hot(warm_labels, args.extra_rate, args.seed)
        evaluate(warm_x, warm_labels, metrics=("map@r", "mrr"))  # first calls warmed up
        record["bare_s"], record["retrieval_s"] = [], []
        for _ in range(args.repeats):
            record["bare_s"].append(timed(phases["bare"])[0])
            record["retrieval_s"].append(timed(phases["retrieval"])[0])
    else:
        record["seconds"], record["values"] = timed(phases[args.worker])
        record["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(record))


def run_phase(args: argparse.Namespace, phase: str, size: int) -> dict:
    """Run ``phase`` in a fresh Python process and return its JSON record."""
    command = [
        sys.executable, __file__, "--worker", phase, "--worker-size", str(size),
        "--dim", str(args.dim), "--min-class", str(args.min_class),
        "--max-class", str(args.max_class), "--noise", str(args.noise),
        "--seed", str(args.seed), "--threads", str(args.threads),
        "--repeats", str(args.repeats), "--labels", args.labels,
        "--extra-rate", str(args.extra_rate),
    ]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--min-class", type=int, default=50)
    parser.add_argument("--max-class", type=int, default=150)
    parser.add_argument("--noise", type=float, default=1.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="0 leaves the library defaults")
    parser.add_argument("--labels", choices=["single", "multi"], default="single")
    parser.add_argument("--extra-rate", type=float, default=0.3)
    parser.add_argument("--json", help="also write the raw records to this file")
    parser.add_argument(
        "--worker", choices=["timing", "bare", "retrieval", "clustering"], help=argparse.SUPPRESS
    )
    parser.add_argument("--worker-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    records = []
    rows = []
    for size in args.sizes:
        timing = run_phase(args, "timing", size)
        phases = ("bare", "retrieval") + (("clustering",) if args.labels == "single" else ())
        memory = {p: run_phase(args, p, size) for p in phases}
        records += [timing, *memory.values()]
        ratios = [r / b for b, r in zip(timing["bare_s"], timing["retrieval_s"], strict=True)]
        values = memory["retrieval"]["values"] | memory.get("clustering", {}).get("values", {})
        rss = {phase: memory[phase]["peak_rss_mib"] for phase in memory}
        own = {phase: rss[phase] - memory[phase]["baseline_rss_mib"] for phase in memory}
        rows.append(
            [
                f"{size:,}",
                str(timing["classes"]),
                str(timing["depth"]),
                f"{statistics.median(timing['bare_s']):.2f}",
                f"{statistics.median(timing['retrieval_s']):.2f}",
                f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})",
                f"{memory['clustering']['seconds']:.2f}" if "clustering" in memory else "-",
                " / ".join(f"{rss[p]:.0f} (+{own[p]:.0f})" for p in memory),
                f"{values['map@r']:.3f} / {values['recall@1']:.3f} / "
                + (f"{values['nmi']:.3f}" if "nmi" in values else "-"),
            ]
        )
        print(f"done N={size}", file=sys.stderr, flush=True)
    header = [
        "N", "labels", "k", "(a) bare s", "(b) retrieval s", "(b)/(a) median (range)",
        "(c) NMI+AMI s", "peak RSS MiB (a) / (b) / (c) (+ over data)", "MAP@R / R@1 / NMI",
    ]  # fmt: skip
    print(
        f"labels={args.labels} dim={args.dim} threads={args.threads or 'default'} "
        f"repeats={args.repeats} (CPU seconds)"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)


if __name__ == "__main__":
    main()
