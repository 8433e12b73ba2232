"""Probe the first steps of a `deepmetric train` run: how the class vectors and the batch
embeddings move (issue 12, "why more classes trained worse").

Builds the run exactly as the trainer does (same seed, data, sampler, model, loss, optimiser
and schedule, `deepmetric.training.trainer._build`), takes its first ``--steps`` optimiser
steps with the trainer's own step function, and measures at every step:

- the rotation of each class vector (the angle between a row before and after the step),
  separately for classes present in the batch and absent from it;
- the cosine between the mean move of the absent classes' unit vectors and minus the batch's
  mean unit embedding (1: every absent class is pushed the same way, away from the batch);
- the mean resultant length of the unit class vectors and of the batch's unit embeddings
  (|mean of unit vectors|: 0 spread out, 1 all equal);
- the batch training accuracy over all classes (argmax of cos(x, w) is the label).

It prints the means over the first and the last ``--window`` steps, one column per variant,
as a Markdown table. Each variant is a list of config overrides:

    .venv/bin/python benchmarks/probe_class_vectors.py --steps 200 \\
        --variant "no warm-up" optimizer.warmup_steps=0 \\
        --variant "warm-up 100" optimizer.warmup_steps=100
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from deepmetric.training import trainer
from deepmetric.training.config import load_config


def resultant(unit_rows: torch.Tensor) -> float:
    """Mean resultant length |mean of the unit rows|."""
    return unit_rows.mean(dim=0).norm().item()


def _batches(sampler, steps: int) -> list[list[int]]:
    """The first ``steps`` batches of the run, over as many epochs as that takes."""
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < steps:
        sampler.set_epoch(epoch)
        batches += list(sampler)
        epoch += 1
    return batches[:steps]


def probe(overrides: list[str], steps: int) -> list[dict[str, float]]:
    """Per-step measurements of the first ``steps`` steps of the run ``overrides`` makes."""
    config = load_config(overrides=["train.threads=1", "train.precision=fp32", *overrides])
    torch.set_num_threads(1)
    parts = trainer._build(config)
    weight = next(p for p in parts.loss_fn.parameters() if p.dim() == 2)
    seen: dict[str, torch.Tensor] = {}

    def keep_inputs(module, args):
        seen["embeddings"], seen["labels"] = args[0].detach(), args[1].detach()

    parts.loss_fn.register_forward_pre_hook(keep_inputs)
    parts.model.train()
    state = trainer.TrainState()
    rows = []
    for batch in _batches(parts.sampler, steps):
        before = F.normalize(weight.detach().clone(), dim=1)
        trainer._step(parts, batch, state)
        state.step += 1
        after = F.normalize(weight.detach(), dim=1)
        unit_x = F.normalize(seen["embeddings"], dim=1)
        present = torch.zeros(len(weight), dtype=torch.bool)
        present[seen["labels"]] = True
        angle = torch.arccos((before * after).sum(dim=1).clamp(-1, 1))
        absent_move = (after - before)[~present].mean(dim=0)
        away = -unit_x.mean(dim=0)
        logits = unit_x @ before.T
        rows.append(
            {
                "rotation, present rows (rad)": angle[present].mean().item(),
                "rotation, absent rows (rad)": angle[~present].mean().item(),
                "cos(absent rows' mean move, minus mean embedding)": F.cosine_similarity(
                    absent_move, away, dim=0
                ).item(),
                "mean resultant, class vectors": resultant(after),
                "mean resultant, batch embeddings": resultant(unit_x),
                "training accuracy (batch, all classes)": (
                    (logits.argmax(dim=1) == seen["labels"]).float().mean().item()
                ),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--window", type=int, default=20, help="steps averaged at each end")
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar=("NAME", "OVERRIDE"),
        required=True,
        help="a column: its name, then config overrides",
    )
    args = parser.parse_args()
    results = {variant[0]: probe(variant[1:], args.steps) for variant in args.variant}
    names = list(results)
    print("| steps | measure | " + " | ".join(names) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in names) + " |")
    for label, window in ((f"1-{args.window}", slice(0, args.window)), ("last", None)):
        if window is None:
            window = slice(args.steps - args.window, args.steps)
            label = f"{args.steps - args.window + 1}-{args.steps}"
        for measure in results[names[0]][0]:
            values = [np.mean([row[measure] for row in results[n][window]]) for n in names]
            print(f"| {label} | {measure} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
