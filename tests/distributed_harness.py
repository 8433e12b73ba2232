"""Run a function on several real processes joined by torch.distributed (gloo, 127.0.0.1).

`run_ranks(fn, world_size, *args)` spawns one process per rank, initialises the default
process group on a free port, calls `fn(rank, world_size, *args)` and returns the ranks'
return values in rank order. Every wait is bounded: processes still running after
`timeout` seconds are killed and the call fails, so a hanging collective cannot block CI.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _child(rank, world_size, port, out, fn, args, timeout):
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            result = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:
        result = ("error", traceback.format_exc())
    Path(out).write_bytes(pickle.dumps(result))


def run_ranks(fn: Callable, world_size: int, *args, timeout: float = 240.0) -> list:
    """`fn(rank, world_size, *args)` on `world_size` processes; their results in rank order."""
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        outs = [os.path.join(folder, f"rank{rank}.pkl") for rank in range(world_size)]
        processes = [
            context.Process(
                target=_child,
                args=(rank, world_size, port, outs[rank], fn, args, timeout / 2),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout} s: killed")
        results = []
        for rank, out in enumerate(outs):
            if not os.path.exists(out):
                code = processes[rank].exitcode
                raise RuntimeError(f"rank {rank} exited with code {code} and no result")
            status, value = pickle.loads(Path(out).read_bytes())
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
