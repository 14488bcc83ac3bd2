"""The process group, when there is one: ``torchrun`` (or ``accelerate launch``) starts N processes that each run
the same command; these helpers let code ask who it is and combine tensors across processes, and do nothing in a
plain single process.

gloo runs on CPU tensors, nccl on CUDA ones; :func:`init_from_environment` picks by device. Every collective here
is a no-op when the world has one process, so callers never branch on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "World",
    "all_gather_objects",
    "all_reduce_sum_",
    "barrier",
    "broadcast_",
    "init_from_environment",
    "launched",
    "world",
]


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one job."""

    rank: int
    size: int

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous part of ``range(n)``; parts differ in length by at most one."""
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> World:
    """The current process group's rank and size; ``World(0, 1)`` without one."""
    if not _active():
        return World(0, 1)
    return World(dist.get_rank(), dist.get_world_size())


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: torch.device | str = "cpu") -> World:
    """Join the launcher's process group if this process was started as one of several and has not joined yet:
    nccl for CUDA devices, gloo otherwise. Returns the world either way."""
    if launched() and not _active():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return world()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it."""
    if _active() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every process with rank ``src``'s, in place; returns it."""
    if _active() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order."""
    if not (_active() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every process gets here."""
    if _active() and dist.get_world_size() > 1:
        dist.barrier()
