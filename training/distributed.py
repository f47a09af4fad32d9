"""Process-group plumbing for `torchrun`: the environment a run sees, collective helpers that are
no-ops in a single process, and the sharded, resumable order in which ranks read the data.

`torchrun --nproc_per_node N -m cotap.cli.main train ...` sets RANK / WORLD_SIZE / LOCAL_RANK;
`init_distributed` then joins the group with gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str | torch.device, local_rank: int = 0) -> torch.device:
    """`spec` checked against this machine: "auto" (cuda:<local_rank> when CUDA is available, else
    cpu), cpu, cuda[:N] (CUDA present, device N existing), or mps. Raises ValueError saying what is
    available, instead of torch's assertion deep inside `.to()`."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {str(spec)!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(spec)!r} asked for, but torch sees no CUDA device here (torch "
                f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use cpu"
            )
        if dev.index is None:
            return torch.device(f"cuda:{local_rank}")
        if dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(spec)!r} does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(spec)!r} asked for, but MPS is not available here; use cpu")
    elif dev.type != "cpu":
        raise ValueError(f"device {str(spec)!r}: use auto, cpu, cuda, cuda:N or mps")
    return dev


def init_distributed(device: str = "auto", backend: str = "auto") -> DistEnv:
    """Join the process group described by torchrun's environment variables (or stay single)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistEnv(0, 1, 0, dev, None)
    chosen = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=chosen, rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, dev, chosen)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over ranks in place (and return it); identity in a single process."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `x` on every rank with rank `src`'s value (in place); identity in a single process."""
    if is_distributed():
        dist.broadcast(x, src=src)
    return x


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's picklable `obj` on rank 0, in rank order (None on the other ranks); `[obj]` in a
    single process. For per-rank state (the memory bank, the queues) that a checkpoint must keep."""
    if not is_distributed():
        return [obj]
    out: list[T] | None = [obj] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (for logging)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


class ShardedOrder:
    """Which dataset indices each rank reads at each step, resumable at any (epoch, position).

    Every epoch draws one permutation from (seed, epoch), drops the tail that does not fill a global
    batch (world_size × batch_size), and hands rank r the r-th slice of each global batch, like
    `DistributedSampler` with `drop_last`. Position p of epoch e is therefore the same batch in any
    process, so a resumed run reads exactly what an unbroken one would have.
    """

    def __init__(self, length: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.length, self.batch_size, self.rank, self.world_size, self.seed = (
            length,
            batch_size,
            rank,
            world_size,
            seed,
        )
        self._cached_epoch: int | None = None
        self._perm = np.arange(0)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"dataset of {length} images is smaller than one global batch "
                f"({world_size} ranks × {batch_size} anchors)"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.length // (self.batch_size * self.world_size)

    def batch(self, epoch: int, position: int) -> list[int]:
        """Dataset indices of this rank's batch `position` of `epoch`."""
        if not 0 <= position < self.steps_per_epoch:
            raise IndexError(f"position {position} outside epoch of {self.steps_per_epoch} steps")
        if self._cached_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.length)
            self._cached_epoch = epoch
        perm = self._perm
        start = (position * self.world_size + self.rank) * self.batch_size
        return [int(i) for i in perm[start : start + self.batch_size]]
