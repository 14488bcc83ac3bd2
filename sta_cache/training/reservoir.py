"""Bounded shuffle buffers of training vectors, one per dictionary, filled while the text streams in.

The text is read once; each dictionary's vectors go into a reservoir of at most ``size`` vectors (appended until
it is full, then written over random slots), and training batches are drawn from it at random. Reservoirs are kept
in bfloat16: float32's range, and its 0.4% rounding is far below any reconstruction error here.
"""

from __future__ import annotations

import torch

from ..configs import TrainConfig

__all__ = ["Reservoir", "reservoir_size"]


def reservoir_size(config: TrainConfig, stacks: int, d: int) -> int:
    """Vectors per reservoir: ``config.buffer_size``, fewer if ``stacks`` reservoirs of that size would exceed
    ``config.buffer_mb``, never fewer than one batch."""
    per_dictionary = int(config.buffer_mb * 2**20) // (stacks * d * 2)
    return max(config.batch_size, min(config.buffer_size, per_dictionary))


class Reservoir:
    """``stacks`` reservoirs of ``size`` vectors of size ``d``, drawing every random choice from ``generator``."""

    def __init__(self, stacks: int, size: int, d: int, generator: torch.Generator):
        self.buffer = torch.zeros(stacks, size, d, dtype=torch.bfloat16)
        self.generator = generator
        self.fill = 0  # slots written so far (at most size)
        self.vectors_in = 0  # vectors offered so far, kept or not

    @property
    def size(self) -> int:
        return self.buffer.shape[1]

    @property
    def full(self) -> bool:
        return self.fill >= self.size

    def insert(self, x: torch.Tensor) -> None:
        """Add ``x [S, n, d]``: append until full, then overwrite random slots."""
        x = x.to(self.buffer.dtype)
        n = x.shape[1]
        M = self.size
        self.vectors_in += n
        room = M - self.fill
        if room > 0:
            take = min(room, n)
            self.buffer[:, self.fill : self.fill + take] = x[:, :take]
            self.fill += take
            x = x[:, take:]
        if x.shape[1]:
            if x.shape[1] > M:
                x = x[:, torch.randperm(x.shape[1], generator=self.generator)[:M]]
            slots = torch.randperm(M, generator=self.generator)[: x.shape[1]]
            self.buffer[:, slots] = x

    def sample(self, count: int) -> torch.Tensor:
        """``count`` vectors drawn with replacement from the filled slots, as float32 ``[S, count, d]``."""
        batch = torch.randint(self.fill, (count,), generator=self.generator)
        return self.buffer.index_select(1, batch).float()

    def subset(self, limit: int) -> torch.Tensor:
        """At most ``limit`` distinct filled slots in random order, as float32 ``[S, <= limit, d]``."""
        chosen = torch.randperm(self.fill, generator=self.generator)[:limit]
        return self.buffer[:, : self.fill].index_select(1, chosen).float()

    def contents(self) -> torch.Tensor:
        """A copy of the filled slots (for a checkpoint)."""
        return self.buffer[:, : self.fill].clone()

    def restore(self, contents: torch.Tensor, vectors_in: int) -> None:
        """Undo :meth:`contents` (the generator's state is restored by its owner)."""
        self.fill = contents.shape[1]
        self.buffer[:, : self.fill] = contents
        self.vectors_in = vectors_in
