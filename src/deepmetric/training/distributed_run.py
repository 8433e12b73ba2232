"""What `deepmetric train` does differently under torchrun: join the process group, wrap the
model in DistributedDataParallel and the loss in `deepmetric.distributed.DistributedLoss`,
shard the evaluation, and let rank 0 alone write the run folder.

    torchrun --nproc-per-node=2 -m deepmetric train train.epochs=2

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `start_session` reads them (gloo on CPU, nccl with one GPU per process). A
plain `deepmetric train` (no WORLD_SIZE, or 1) is one process and none of this applies: every
function here returns its inputs unchanged.

With W processes the P classes of each global P x K batch are split over the ranks
(`DistributedPKBatchSampler`), so a run with W processes trains on the same global batches
as one process. BatchNorm layers normalise with the statistics of the global batch (sync
batch norm: torch's on GPUs, `SyncBatchNormCPU` on CPUs), so the model computes what it
computes in one process. Checkpoints hold the plain modules' states, so they are the same
files whatever the number of processes.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from deepmetric.distributed import (
    DistributedLoss,
    all_gather_rows,
    all_reduce_with_grad,
    rank_and_world_size,
)
from deepmetric.inference import embed
from deepmetric.training.checkpoint import get_rng_states, set_rng_states
from deepmetric.training.data import LabeledSubset
from deepmetric.training.errors import CheckpointError
from deepmetric.training.run_folder import MetricsLog, RunFolder

__all__ = [
    "Session",
    "SyncBatchNormCPU",
    "TrainingModule",
    "any_rank",
    "embed_sharded",
    "is_main",
    "metrics_log",
    "restore_rng_states",
    "rng_states",
    "start_session",
    "wrap_for_training",
]


@dataclass
class Session:
    """This process's place in the job: rank, world size, and whether it started the group."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder and prints."""
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group if this session joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def is_main() -> bool:
    """Whether this process is rank 0 (always, in a single process): the one that writes."""
    return rank_and_world_size()[0] == 0


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on some rank (one tiny all_reduce), so that all ranks decide
    together, e.g. to stop after a signal that reached them at different steps."""
    _, world = rank_and_world_size()
    if world == 1:
        return flag
    value = torch.tensor([int(flag)], device=_wire())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class _NoLog:
    """The metrics log of ranks other than 0: they write nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def metrics_log(run: RunFolder, **kwargs) -> MetricsLog | _NoLog:
    """The run's `MetricsLog` on rank 0; a log that writes nothing on the other ranks."""
    return MetricsLog(run, **kwargs) if is_main() else _NoLog()


def rng_states() -> dict | list:
    """`get_rng_states()`; with several ranks, every rank's (a list in rank order), so a
    resumed run gives each rank back its own random streams (augmentation, dropout)."""
    _, world = rank_and_world_size()
    if world == 1:
        return get_rng_states()
    states: list = [None] * world
    dist.all_gather_object(states, get_rng_states())
    return states


def restore_rng_states(states: dict | list) -> None:
    """Restore what `rng_states` saved: this rank's entry of a list, or the one state."""
    rank, world = rank_and_world_size()
    if isinstance(states, list):
        if len(states) != world:
            raise CheckpointError(
                f"the checkpoint was written by {len(states)} processes but this run has "
                f"{world}: resume with --nproc-per-node={len(states)} (the sampler splits each "
                "batch by the number of processes)"
            )
        states = states[rank]
    set_rng_states(states)


def _wire() -> torch.device:
    """Where collectives take their tensors: the GPU with nccl, the CPU with gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def start_session(device: str = "auto") -> Session:
    """Join the process group torchrun describes in the environment, if any.

    `device` is train.device: a CUDA run uses nccl and the GPU LOCAL_RANK (so "cuda" means
    this process's GPU); otherwise gloo. Already initialised groups are used as they are.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = rank_and_world_size()
        return Session(rank, world, owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Session()
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda:")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return Session(dist.get_rank(), dist.get_world_size(), owns_group=True)


class SyncBatchNormCPU(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all ranks, for CPU (torch's SyncBatchNorm needs
    a GPU). Training mode normalises with the mean and biased variance of the rows of every
    rank (two differentiable all_reduce: sums, then squared deviations) and updates the
    running statistics with them, identically on every rank; eval mode is plain batch norm.
    Same parameters and buffers as `nn.BatchNorm1d/2d/3d`, so state dicts carry over.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        _, world = rank_and_world_size()
        if not self.training or world == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.new_tensor([input.numel() / input.shape[1]])
        sums = all_reduce_with_grad(torch.cat([input.sum(dims), count]))
        total = sums[-1].detach()
        mean = sums[:-1] / total
        centred = input - mean.view(shape)
        var = all_reduce_with_grad(centred.square().sum(dims)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (total / (total - 1).clamp_min(1))
                self.running_mean.lerp_(mean.to(self.running_mean), factor)
                self.running_var.lerp_(unbiased.to(self.running_var), factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """`module` with every BatchNorm1d/2d/3d replaced by a SyncBatchNormCPU holding the
        same parameters and buffers."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            synced = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
            )
            # the same Parameter and buffer objects: an optimiser built before still sees them
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(synced, name, getattr(module, name))
            return synced.train(module.training)
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


class TrainingModule(nn.Module):
    """Runs `runner` (a DDP model, a DistributedLoss) but saves and loads the state of the
    plain `module`, so checkpoints do not depend on the number of processes."""

    def __init__(self, runner: nn.Module, module: nn.Module) -> None:
        super().__init__()
        self.runner = runner
        self._plain = [module]  # a list: not registered twice

    @property
    def module(self) -> nn.Module:
        """The plain module (what evaluation embeds with, and what checkpoints hold)."""
        return self._plain[0]

    def forward(self, *args, **kwargs):
        return self.runner(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict, assign)


def _ddp(module: nn.Module) -> DistributedDataParallel:
    """DDP that never broadcasts buffers during forward: they are identical on every rank
    (sync batch norm, a memory fed the global batch), and evaluation calls the plain module."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(module, forward_sync_buffers=False)
    return DistributedDataParallel(module, broadcast_buffers=False)


def wrap_for_training(
    model: nn.Module, loss_fn: nn.Module, miner: nn.Module | None, mode: str | None = None
) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """(model, loss, miner) for one training step of this process.

    In a single process they come back unchanged. Under torch.distributed the model runs
    under DDP (with sync batch norm), the loss is a `DistributedLoss` that also runs the miner
    on the gathered batch (so the miner returned is None), and the loss's own parameters
    (proxies) are averaged by a DDP of their own. `mode` None picks "local_anchor" for the
    losses that support it (exact, 1/W of the loss's work per rank) and "replicated" for the
    others.
    """
    _, world = rank_and_world_size()
    if world == 1:
        return model, loss_fn, miner
    device = next(model.parameters()).device
    if device.type == "cuda":
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        synced = SyncBatchNormCPU.convert(model)
    if synced is not model:
        raise TypeError("the model itself is a batch norm layer: wrap it in a module first")
    runner = _ddp(model)
    if mode is None:
        supported = getattr(loss_fn, "local_anchor_supported", False)
        mode = "local_anchor" if supported else "replicated"
    global_loss: nn.Module = DistributedLoss(loss_fn, mode, miner=miner)
    if any(p.requires_grad for p in loss_fn.parameters()):
        global_loss = _ddp(global_loss)
    return TrainingModule(runner, model), TrainingModule(global_loss, loss_fn), None


def embed_sharded(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: torch.dtype = torch.float32,
) -> np.ndarray:
    """`deepmetric.inference.embed` with the items split over the ranks: each rank embeds a
    contiguous share and every rank gets all embeddings, in dataset order."""
    model = model.module if isinstance(model, TrainingModule) else model
    rank, world = rank_and_world_size()
    if world == 1 or len(dataset) < world:
        return embed(model, dataset, batch_size=batch_size, device=device, precision=precision)
    bounds = np.linspace(0, len(dataset), world + 1).astype(np.int64)
    share = LabeledSubset(dataset, np.arange(bounds[rank], bounds[rank + 1]))
    local = embed(model, share, batch_size=batch_size, device=device, precision=precision)
    rows = all_gather_rows(torch.from_numpy(local).to(_wire()), sizes=np.diff(bounds).tolist())
    return rows.cpu().numpy()
