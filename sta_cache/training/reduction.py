"""How a training process's partial results combine with the other processes' (``torchrun``): summed, averaged,
taken from rank 0 or gathered over the process group, or left alone when each process works on its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed

__all__ = ["LOCAL", "Reduction"]


@dataclass(frozen=True)
class Reduction:
    """Over the process group (each process holds part of every dictionary's data), or not at all (one process,
    or each process owning whole dictionaries)."""

    across_processes: bool

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum_(tensor) if self.across_processes else tensor

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over the processes, in place (what data-parallel gradient descent applies)."""
        if not self.across_processes:
            return tensor
        return distributed.all_reduce_sum_(tensor).div_(distributed.world().size)

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor, in place on every process."""
        return distributed.broadcast_(tensor) if self.across_processes else tensor

    def gather(self, obj) -> list:
        return distributed.all_gather_objects(obj) if self.across_processes else [obj]


LOCAL = Reduction(across_processes=False)
