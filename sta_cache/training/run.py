"""The state of one training run: stacked SAEs, reservoirs, random generator, stream position and schedule.

Everything that an interrupted run needs to continue exactly as if uninterrupted is here and in
:meth:`TrainingRun.state_dict`; the loop that drives it is :mod:`sta_cache.training.loop`.
"""

from __future__ import annotations

import math

import torch

from ..configs import TrainConfig
from ..dictionary import KINDS
from .reduction import LOCAL, Reduction
from .reservoir import Reservoir, reservoir_size
from .sae import StackedTopKSAE

INIT_VECTORS = 8192  # per dictionary, for b_dec, the loss normalizer, data-initialised atoms and the W_enc scale
TIMERS = ("collect", "collect_cpu", "train", "train_cpu")  # wall-clock and process CPU seconds

__all__ = ["INIT_VECTORS", "TIMERS", "TrainingRun"]


class TrainingRun:
    """Dictionaries ``layers x KINDS x heads`` (one shared head unless ``config.per_head``), stacked in that
    order; ``windows`` training windows of ``per_window`` vectors each are streamed in (this process's, when
    ``reduce`` averages its steps with other processes')."""

    def __init__(
        self,
        config: TrainConfig,
        layers: list[int],
        heads: int,
        d: int,
        windows: int,
        per_window: int,
        reduce: Reduction = LOCAL,
    ):
        self.config = config
        self.layers = layers
        self.hd = heads if config.per_head else 1
        self.S = len(layers) * len(KINDS) * self.hd
        k_of = {"key": config.k_key, "value": config.k_value}
        ks = [k_of[kind] for _ in layers for kind in KINDS for _ in range(self.hd)]
        self.sae = StackedTopKSAE(self.S, d, config.n_atoms, ks, config, reduce)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.reservoir = Reservoir(self.S, reservoir_size(config, self.S, d), d, self.generator)
        self.windows_done = 0
        self.steps_done = 0
        self.initialized = False
        self.total_vectors = windows * per_window
        if config.steps is not None:
            self.total_steps = int(config.steps)
        else:
            self.total_steps = max(1, math.ceil(config.epochs * self.total_vectors / config.batch_size))
        self.seconds = dict.fromkeys(TIMERS, 0.0)

    def index(self, layer_pos: int, kind: int, head: int) -> int:
        """Position in the stack of the dictionary of the ``layer_pos``-th layer, kind ``KINDS[kind]``, ``head``."""
        return (layer_pos * len(KINDS) + kind) * self.hd + head

    def stack(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per-layer ``[Hd, n, d]`` keys/values -> ``[S, n, d]`` in dictionary order."""
        return torch.cat([t for i in self.layers for t in (keys[i], values[i])], dim=0)

    def by_layer(self, values: dict[str, list[float]]) -> dict[str, dict[str, dict[str, float]]]:
        """``{stat: [S values]}`` -> ``{layer: {kind: {stat: mean over heads}}}``."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for p, layer in enumerate(self.layers):
            out[str(layer)] = {}
            for kind_idx, kind in enumerate(KINDS):
                idx = [self.index(p, kind_idx, h) for h in range(self.hd)]
                out[str(layer)][kind] = {
                    name: round(sum(v[i] for i in idx) / len(idx), 6) for name, v in values.items()
                }
        return out

    # ----------------------------------------------------------------------------- schedule
    def lr(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant, then linear decay to zero over the final
        ``decay_fraction`` of the steps."""
        c, total = self.config, self.total_steps
        scale = 1.0
        if c.warmup_steps > 0:
            scale = min(scale, (step + 1) / c.warmup_steps)
        decay = int(c.decay_fraction * total)
        if decay > 0 and step >= total - decay:
            scale = min(scale, (total - step) / decay)
        return c.lr * scale

    def owed_steps(self, final: bool) -> int:
        """Steps due so far: proportional to the vectors that have streamed in, all of them at the end."""
        if final:
            return self.total_steps
        return min(self.total_steps, (self.total_steps * self.reservoir.vectors_in) // max(self.total_vectors, 1))

    def ready(self, final: bool) -> bool:
        """Whether training can start: a full reservoir, or at the end of the text any vectors at all."""
        return self.reservoir.full or (final and self.reservoir.fill >= 1)

    # ----------------------------------------------------------------------------- training
    def initialize(self) -> None:
        """Initialize from (a random sample of at most INIT_VECTORS vectors of) the first reservoir fill."""
        self.sae.initialize(self.reservoir.subset(INIT_VECTORS), self.generator)
        self.initialized = True

    def train_step(self) -> dict[str, torch.Tensor]:
        stats = self.sae.step(self.reservoir.sample(self.config.batch_size), self.steps_done, self.lr(self.steps_done))
        self.steps_done += 1
        return stats

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "sae": self.sae.state_dict(),
            "generator": self.generator.get_state(),
            "buffer": self.reservoir.contents(),
            "counters": torch.tensor(self._counters()),
            "seconds": torch.tensor([self.seconds[name] for name in TIMERS], dtype=torch.float64),
        }

    def _counters(self) -> list[int]:
        reservoir = self.reservoir
        return [reservoir.fill, self.windows_done, reservoir.vectors_in, self.steps_done, int(self.initialized)]

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.generator.set_state(state["generator"])
        _, self.windows_done, vectors_in, self.steps_done, initialized = (int(v) for v in state["counters"])
        self.reservoir.restore(state["buffer"], vectors_in)
        self.initialized = bool(initialized)
        self.seconds = dict(zip(TIMERS, (float(v) for v in state["seconds"]), strict=True))
