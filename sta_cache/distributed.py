"""Process groups: this process's rank, the tensor-parallel group of a model, which KV heads a rank holds, and
collectives over a group. ``torchrun`` (or ``accelerate launch``) starts N processes that each run the same code;
everything here also works without ``torch.distributed`` initialised (one process, rank 0 of 1), where every
collective is a no-op, so single-process code calls the same functions.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "Ranks",
    "all_gather_objects",
    "all_reduce_sum",
    "all_reduce_sum_",
    "barrier",
    "broadcast_",
    "init_from_environment",
    "kv_heads_of_rank",
    "launched",
    "tensor_parallel",
    "world",
]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a group of ``size`` processes; ``group`` is the ``torch.distributed`` process group
    (None: the default group, all processes)."""

    rank: int = 0
    size: int = 1
    group: object | None = None

    def __deepcopy__(self, memo: dict) -> Ranks:
        return self  # a process group is a handle to shared state, never copied (copy.deepcopy of a cache)

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous part of ``range(n)``; parts differ in length by at most one."""
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> Ranks:
    """All processes (the default group), or this process alone when ``torch.distributed`` is not initialised."""
    if not _active():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size())


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: torch.device | str = "cpu") -> Ranks:
    """Join the launcher's process group if this process was started as one of several and has not joined yet:
    nccl for CUDA devices, gloo otherwise. Returns the world either way."""
    if launched() and not _active():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        dist.init_process_group(backend="nccl" if torch.device(device).type == "cuda" else "gloo")
    return world()


def tensor_parallel(model: torch.nn.Module) -> Ranks:
    """The tensor-parallel group of a transformers model loaded with ``tp_plan="auto"`` (its ``tp_size`` and the
    ``"tp"`` dimension of its device mesh), or this process alone for a model that is not tensor-parallel."""
    size = getattr(model, "tp_size", None) or 1
    mesh = getattr(model, "_device_mesh", None)
    if size <= 1 or mesh is None:
        return Ranks()
    names = mesh.mesh_dim_names or ()
    if "tp" in names:
        mesh = mesh["tp"]
    elif mesh.ndim != 1:
        raise ValueError(f"the model's device mesh {mesh} has no 'tp' dimension: cannot tell its tensor-parallel group")
    return Ranks(mesh.get_local_rank(), mesh.size(), mesh.get_group())


def kv_heads_of_rank(num_kv_heads: int, local_heads: int, ranks: Ranks) -> range | None:
    """The model's KV heads that a rank holding ``local_heads`` of ``num_kv_heads`` holds, or None if no split of
    the heads over ``ranks`` gives it that many.

    transformers' tensor parallelism shards ``k_proj``/``v_proj`` by output columns in contiguous blocks of whole
    heads: with ``g = gcd(num_kv_heads, size)`` the ranks form ``g`` consecutive groups and group ``i`` holds heads
    ``[i * H/g, (i + 1) * H/g)`` (``g = size`` when the heads divide evenly; fewer heads than ranks are replicated,
    as ``unit_colwise`` does)."""
    if local_heads == num_kv_heads:
        return range(num_kv_heads)
    groups = math.gcd(num_kv_heads, ranks.size)
    if local_heads * groups != num_kv_heads:
        return None
    first = ranks.rank // (ranks.size // groups) * local_heads
    return range(first, first + local_heads)


def all_reduce_sum_(tensor: torch.Tensor, ranks: Ranks | None = None) -> torch.Tensor:
    """Sum ``tensor`` over the processes of ``ranks`` (default: all), in place; returns it. A collective: every one
    of them must call it."""
    ranks = ranks or world()
    if ranks.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=ranks.group)
    return tensor


def all_reduce_sum(values: list[float], ranks: Ranks) -> list[float]:
    """``values`` summed element-wise over the processes of ``ranks``; ``values`` itself for a group of one.
    Summed in float64, exact for byte counts below 2**53."""
    if ranks.size == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(ranks.group) == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL reduces only CUDA tensors
    return all_reduce_sum_(total, ranks).tolist()


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every process with rank ``src``'s, in place; returns it."""
    if world().size > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order."""
    if world().size == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every process gets here."""
    if world().size > 1:
        dist.barrier()
