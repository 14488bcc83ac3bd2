"""Per-layer budgets: spend a bytes target on the layers and kinds where atoms buy the most.

A layer's keys or values coded with few atoms cost the model more in some layers than in others (SmolLM2's first
two layers barely notice 4 key atoms, layer 8 does). :class:`LayerSensitivity` holds that cost as measured by
:func:`sta_cache.evaluation.sensitivity.measure_sensitivity`; :func:`allocate` treats the costs as additive over
layers and kinds and finds the atom counts with the least summed cost that fit a byte budget, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .dictionary import KINDS, KVDictionaryConfig
from .validation import check_int, check_positive_float

__all__ = ["LayerSensitivity", "allocate", "code_bytes_per_vector_pair"]


@dataclass(frozen=True)
class LayerSensitivity:
    """``kl[kind][j][i]``: mean KL divergence (nats per scored token) of the model's predictions from DynamicCache's
    when only dictionary layer ``j``'s ``kind`` ("key" or "value") is coded at ``atoms[i]`` atoms; ``measured_on``
    says on what text and how it was fed."""

    atoms: tuple[int, ...]
    kl: dict[str, tuple[tuple[float, ...], ...]]
    measured_on: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "atoms", tuple(self.atoms))
        if sorted(set(self.atoms)) != list(self.atoms) or not self.atoms:
            raise ValueError(f"atoms must be increasing and distinct, got {self.atoms}")
        for k in self.atoms:
            check_int("each of atoms", k, minimum=1)
        if set(self.kl) != set(KINDS):
            raise ValueError(f"kl needs a table for each of {KINDS}, got {sorted(self.kl)}")
        tables = {kind: tuple(tuple(float(x) for x in row) for row in rows) for kind, rows in self.kl.items()}
        object.__setattr__(self, "kl", tables)
        layers = {len(rows) for rows in tables.values()}
        if len(layers) != 1 or any(len(row) != len(self.atoms) for rows in tables.values() for row in rows):
            raise ValueError("kl needs one row per dictionary layer for each kind, one value per entry of atoms")

    @property
    def num_layers(self) -> int:
        return len(self.kl["key"])

    def to_dict(self) -> dict:
        return {
            "atoms": list(self.atoms),
            "kl": {k: [list(r) for r in v] for k, v in self.kl.items()},
            "measured_on": self.measured_on,
        }


def code_bytes_per_vector_pair(bits_per_element: float, meta: KVDictionaryConfig) -> float:
    """The bytes one key and one value vector of a KV head may take for the cache to store ``bits_per_element``:
    bits x 2 x head_dim / 8, less the share of the int32 position that each token of a pre-RoPE layer keeps for
    all its heads (batch 1)."""
    positions = 4 / meta.num_kv_heads if meta.key_space == "pre_rope" else 0.0
    return bits_per_element * 2 * meta.head_dim / 8 - positions


def allocate(
    sensitivity: LayerSensitivity, vector_bytes: Callable[[int], int], bytes_per_pair: float
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(k_key, k_value)``, one entry per dictionary layer, whose key and value codes take at most
    ``bytes_per_pair`` bytes per token and KV head on average over the layers (``vector_bytes(k)``: the bytes of one
    vector coded at k atoms; :func:`code_bytes_per_vector_pair` converts a bits target) with
    the least summed KL: a multiple-choice knapsack over the measured atom counts, solved exactly by dynamic
    programming over bytes. Raises ValueError if even the fewest measured atoms do not fit."""
    check_positive_float("bytes_per_pair", bytes_per_pair)
    slots = [(kind, j) for kind in KINDS for j in range(sensitivity.num_layers)]
    costs = [vector_bytes(k) for k in sensitivity.atoms]
    budget = math.floor(bytes_per_pair * sensitivity.num_layers + 1e-9)
    if min(costs) * len(slots) > budget:
        raise ValueError(
            f"{bytes_per_pair:.1f} bytes per key and value cannot hold even {sensitivity.atoms[0]} atoms for each "
            f"({2 * min(costs)} bytes)"
        )
    # least[b]: the least summed KL of the slots so far within b bytes; choices[s][b]: slot s's option there
    least = torch.zeros(budget + 1, dtype=torch.float64)
    choices = []
    for kind, j in slots:
        options = torch.full((len(costs), budget + 1), math.inf, dtype=torch.float64)
        for i, (cost, kl) in enumerate(zip(costs, sensitivity.kl[kind][j], strict=True)):
            if cost <= budget:
                options[i, cost:] = least[: budget + 1 - cost] + kl
        least, choice = options.min(dim=0)  # the first of equal options: the fewest atoms
        choices.append(choice)
    chosen, remaining = {}, budget
    for slot, choice in zip(reversed(slots), reversed(choices), strict=True):
        i = int(choice[remaining])
        chosen[slot] = sensitivity.atoms[i]
        remaining -= costs[i]
    per_kind = {kind: tuple(chosen[kind, j] for j in range(sensitivity.num_layers)) for kind in KINDS}
    return per_kind["key"], per_kind["value"]
