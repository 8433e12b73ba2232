"""`python -m deepmetric`, and `deepmetric train` on 2 processes: under torchrun (the CLI end
to end) and through `train()` in processes of a gloo group (interrupt and --resume).

The runs are small (an MLP on 12 classes of the bundled Kanji-Fonts-32, 2 epochs of 4 global
P x K batches, fp32, one thread per process) and train the triplet loss with a miner, which
the trainer runs in local-anchor mode: the path with the most communication.

Tolerances: one process and two processes add the same float32 numbers in another order
(the gathered rows, the all-reduced gradients and batch statistics), so after training the
weights differ by float32 rounding (measured: 4e-7 relative) and the evaluation embeddings
by 1e-6 (unit vectors): compared to 1e-5. The metrics, computed from ranks of distances, came
out identical; they are compared to 1e-3 absolute (a tie flipped by rounding would move
Recall@1 of 470 queries by 0.002). The optimiser is SGD: Adam divides a gradient by its own
running size, so the rounding noise in the gradient of a bias followed by batch norm (which
cancels it: its true gradient is 0) becomes steps of full size that differ between the runs
(measured with AdamW: embeddings 6e-3 apart, Recall@4 3 queries apart). A resumed run
repeats the same operations in the same order: it must match the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed_harness import free_port, run_ranks

from deepmetric.cli import main
from deepmetric.inference import embed, load_model
from deepmetric.training.config import load_config
from deepmetric.training.data import data_from_spec
from deepmetric.training.trainer import TrainState, train

OVERRIDES = [
    "data.train_classes=12",
    "data.test_classes=10",
    "data.augment_shift=0",
    "model.name=mlp",
    "model.hidden_dims=[32]",
    "model.embedding_dim=16",
    "loss.name=TripletMarginLoss",
    "loss.params={margin: 0.2}",
    "miner.name=BatchHardMiner",
    "optimizer.name=SGD",
    "optimizer.lr=0.05",
    "train.epochs=2",
    "train.classes_per_batch=6",
    "train.samples_per_class=4",
    "train.batches_per_epoch=4",
    "train.precision=fp32",
    "train.device=cpu",
    "train.threads=1",
    "train.checkpoint_every_steps=1",
    "eval.before_training=false",
    "report.enabled=false",
]
METRICS_TOLERANCE = 1e-3


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "deepmetric", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: deepmetric train" in done.stdout


def _torchrun(arguments: list[str], script: bool = False) -> subprocess.CompletedProcess:
    """torchrun --nproc-per-node=2 -m deepmetric ARGUMENTS (or the console script)."""
    program = [str(Path(sys.executable).parent / "deepmetric")] if script else ["-m", "deepmetric"]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        *program,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        launcher + arguments, capture_output=True, text=True, timeout=300, env=environment
    )


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "--quiet", "--run-dir", str(one), *OVERRIDES]) == 0
    done = _torchrun(["train", "--quiet", "--run-dir", str(two), *OVERRIDES])
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(one / "embeddings.npz") as a, np.load(two / "embeddings.npz") as b:
        np.testing.assert_allclose(b["embeddings"], a["embeddings"], rtol=0, atol=1e-5)
    metrics = [json.loads((run / "summary.json").read_text())["after"] for run in (one, two)]
    assert set(metrics[0]) == set(metrics[1])
    for name, value in metrics[0].items():
        assert metrics[1][name] == pytest.approx(value, abs=METRICS_TOLERANCE), name
    # rank 0 alone wrote the log: one line per record, as in one process
    lines = [len((run / "metrics.jsonl").read_text().splitlines()) for run in (one, two)]
    assert lines[0] == lines[1]

    # deepmetric embed (the console script) on 2 processes: each embeds a share, rank 0
    # writes them all in order
    out = tmp_path / "sharded.npz"
    embed_args = ["embed", str(two), "kanji_fonts", "--split", "test", "--out", str(out)]
    done = _torchrun(embed_args, script=True)
    assert done.returncode == 0, done.stderr[-3000:]
    model, config, _ = load_model(two / "checkpoints" / "best.pt")
    dataset = data_from_spec("kanji_fonts", "test", config.data)
    whole = embed(model, dataset, batch_size=config.eval.batch_size)
    with np.load(out) as sharded:
        # float32 matmuls over half the rows or all of them round alike to ~1e-7
        np.testing.assert_allclose(sharded["embeddings"], whole, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(sharded["labels"], dataset.labels)


class _Stop(Exception):
    pass


def _train_ranks(rank, world, folder):
    """An uninterrupted run, then a run stopped after step 3 and resumed, on every rank."""
    config = load_config(overrides=OVERRIDES)

    def stop_at_3(state: TrainState) -> None:
        if state.step == 3:
            raise _Stop

    straight = train(config, f"{folder}/straight", quiet=True)
    with contextlib.suppress(_Stop):
        train(config, f"{folder}/resumed", quiet=True, on_step=stop_at_3)
        raise AssertionError("the run was not stopped")
    return straight, train(config, f"{folder}/resumed", resume=True, quiet=True)


@pytest.mark.slow
def test_interrupted_two_process_run_resumes_exactly(tmp_path):
    for straight, resumed in run_ranks(_train_ranks, 2, str(tmp_path), timeout=400):
        assert resumed["after"] == straight["after"]  # exactly: the same steps, same order
        assert resumed["steps"] == straight["steps"] == 8
    files = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "straight").iterdir())
