"""Forward+backward time and peak memory of the proxy, centre and softmax-classifier losses,
as multiples of the classifier floor: one (N, C) matmul x W^T, F.cross_entropy, backward
(to the embeddings and to W), which is the least any loss with C class vectors can cost.

Every loss here owns (C, D) class vectors that require grad, as the floor's W does. Labels
are arange(N) % C, so every class is present once N >= C. Each case runs in its own process
with one thread (see harness.py): first one forward+backward for the peak resident memory
above the baseline, then `repeats` rounds that time the floor and the case one after the
other. "x floor" is median(case CPU s) / median(floor CPU s) from the same process, so a
busy machine slows both alike.

.venv/bin/python benchmarks/bench_proxy.py --sizes 1024 4096
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from harness import peak_memory_mib, start_peak_memory  # noqa: E402

from deepmetric.distances import CosineSimilarity  # noqa: E402
from deepmetric.losses import additive_margin, distillation, proxy, softmax  # noqa: E402

NUM_CLASSES = 1000


@functools.cache
def _class_weights(dim: int) -> torch.nn.Parameter:
    torch.manual_seed(1)
    return torch.nn.Parameter(torch.randn(NUM_CLASSES, dim) / dim**0.5)


@functools.cache
def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES


@functools.cache
def _loss(name: str, dim: int) -> torch.nn.Module:
    torch.manual_seed(1)
    builders = {
        "normalized softmax": lambda: softmax.NormalizedSoftmaxLoss(NUM_CLASSES, dim),
        "heated-up softmax": lambda: softmax.HeatedUpSoftmaxLoss(NUM_CLASSES, dim, heat_up_at=1),
        "L-Softmax (m=4)": lambda: softmax.LargeMarginSoftmaxLoss(NUM_CLASSES, dim),
        "SphereFace (m=4)": lambda: softmax.SphereFaceLoss(NUM_CLASSES, dim),
        "CosFace": lambda: softmax.CosFaceLoss(NUM_CLASSES, dim),
        "ArcFace": lambda: softmax.ArcFaceLoss(NUM_CLASSES, dim),
        "ArcFace (easy margin)": lambda: softmax.ArcFaceLoss(NUM_CLASSES, dim, easy_margin=True),
        "Proxy-NCA (eq. 13, excl. positive)": lambda: proxy.ProxyNCALoss(NUM_CLASSES, dim),
        "Proxy-NCA (eq. 14, incl. positive)": lambda: proxy.ProxyNCALoss(
            NUM_CLASSES, dim, exclude_positive=False
        ),
        "Proxy-NCA (3 per class, dynamic; 3C proxies)": lambda: proxy.ProxyNCALoss(
            NUM_CLASSES, dim, proxies_per_class=3, assignment="dynamic"
        ),
        "Proxy-Anchor": lambda: proxy.ProxyAnchorLoss(NUM_CLASSES, dim),
        "Centre loss (+ softmax, centre update)": lambda: proxy.CenterLoss(NUM_CLASSES, dim),
        "Additive margin (Euclidean)": lambda: additive_margin.AdditiveMarginLoss(
            NUM_CLASSES, dim, margin=0.5
        ),
        "Additive margin (cosine)": lambda: additive_margin.AdditiveMarginLoss(
            NUM_CLASSES, dim, margin=0.35, scale=30.0, distance=CosineSimilarity()
        ),
        "Additive margin (adaptive, Euclidean)": lambda: additive_margin.AdditiveMarginLoss(
            NUM_CLASSES, dim, margin=additive_margin.AdaptiveMargin(update_every=2)
        ),
    }
    return builders[name]()


def classifier_floor(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One (N, C) matmul and a cross-entropy: the floor of a C-class classifier loss."""
    return F.cross_entropy(x @ _class_weights(x.shape[1]).T, _labels(len(x)))


@functools.cache
def _class_weights_3c(dim: int) -> torch.nn.Parameter:
    torch.manual_seed(1)
    return torch.nn.Parameter(torch.randn(3 * NUM_CLASSES, dim) / dim**0.5)


def classifier_floor_3c(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The floor with 3 C class vectors: what 3 proxies per class cannot go below."""
    return F.cross_entropy(x @ _class_weights_3c(x.shape[1]).T, _labels(len(x)))


def distillation_logits(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The floor's logits distilled towards a fixed teacher's (T = 4)."""
    logits = x @ _class_weights(x.shape[1]).T
    teacher = _teacher(len(x))
    return distillation.distillation_loss(logits, teacher_logits=teacher, temperature=4.0)


@functools.cache
def _teacher(n: int) -> torch.Tensor:
    return torch.randn(n, NUM_CLASSES, generator=torch.Generator().manual_seed(2)) * 3


def _case(name: str):
    def case(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _loss(name, x.shape[1])(x, _labels(len(x)))

    case.__name__ = case.__qualname__ = _case_id(name)
    return case


def _case_id(name: str) -> str:
    return "case_" + "".join(ch if ch.isalnum() else "_" for ch in name)


# module-level functions, so the spawned worker processes can find them by name
CASES = {}
for _name in [
    "normalized softmax",
    "heated-up softmax",
    "CosFace",
    "ArcFace",
    "ArcFace (easy margin)",
    "SphereFace (m=4)",
    "L-Softmax (m=4)",
    "Proxy-NCA (eq. 14, incl. positive)",
    "Proxy-NCA (eq. 13, excl. positive)",
    "Proxy-NCA (3 per class, dynamic; 3C proxies)",
    "Proxy-Anchor",
    "Centre loss (+ softmax, centre update)",
    "Additive margin (Euclidean)",
    "Additive margin (cosine)",
    "Additive margin (adaptive, Euclidean)",
]:
    globals()[_case_id(_name)] = CASES[_name] = _case(_name)
CASES["floor with 3C class vectors"] = classifier_floor_3c
CASES["distillation (floor logits, T=4)"] = distillation_logits


def _child(case, n: int, dim: int, repeats: int, queue) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    embeddings = torch.randn(n, dim)
    labels = torch.arange(n)
    for warm_up in (case, classifier_floor):
        warm_up(embeddings[:64].clone().requires_grad_(), labels[:64]).backward()
    x = embeddings.clone().requires_grad_()
    before = start_peak_memory()
    case(x, labels).backward()
    peak = peak_memory_mib(before)
    times = {case: [], classifier_floor: []}
    for _ in range(repeats):
        for timed in (classifier_floor, case):
            x.grad = None
            start = time.process_time()
            timed(x, labels).backward()
            times[timed].append(time.process_time() - start)
    case_s, floor_s = (statistics.median(times[k]) for k in (case, classifier_floor))
    queue.put((case_s, floor_s, peak))


def measure_against_floor(case, n: int, dim: int, repeats: int, timeout: float = 600):
    """(case CPU s, floor CPU s, peak extra MiB), or None on timeout or crash."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(case, n, dim, repeats, queue))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        return None
    return None if queue.empty() else queue.get()


def run_table(cases: dict, sizes: list[int], dim: int, repeats: int) -> str:
    """Markdown table of every case at every size, with ratios to the classifier floor."""
    rows = [
        f"| case (C = {NUM_CLASSES}, D = {dim}) | N | CPU s | floor CPU s | x floor | extra MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in sizes:
        for name, case in {"floor: x W^T + cross_entropy": classifier_floor, **cases}.items():
            rows.append(_row(name, n, measure_against_floor(case, n, dim, repeats)))
            print(rows[-1], flush=True)
    return "\n".join(rows)


def _row(name: str, n: int, result) -> str:
    if result is None:
        return f"| {name} | {n} | did not finish | | | |"
    seconds, floor, extra = result
    return f"| {name} | {n} | {seconds:.4f} | {floor:.4f} | {seconds / floor:.2f} | {extra:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", help="case names to run")
    args = parser.parse_args()
    chosen = {k: v for k, v in CASES.items() if not args.only or k in args.only}
    print(run_table(chosen, args.sizes, args.dim, args.repeats))


if __name__ == "__main__":
    main()
