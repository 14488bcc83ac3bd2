"""A training-free rotated scalar quantizer in the style of TurboQuant (MSE variant) and PolarQuant, as a
transformers ``Cache``: the strongest kind of baseline at 2-4 bits per element.

Each key and value vector ``x`` (one per token and KV head) is stored as

* its norm ``|x|`` in float16, and
* ``y = R x / |x|``, a random rotation of its direction, quantized coordinate by coordinate with the Lloyd-Max
  codebook of a random unit vector's coordinate (:mod:`sta_cache.lloyd_max`): ``b`` bits per coordinate, packed
  into bytes.

It is read back as ``|x| Rᵀ c[codes]``. ``R`` is a Haar-random orthogonal matrix, one per layer and kind, drawn
from a seeded generator (the quality of one draw varies; average several seeds). A fractional rate ``b + f``
gives a fixed set of ``round(f d)`` rotated channels (the first ones) ``b + 1`` bits, as TurboQuant splits
channels. Stored bits per element: ``b + f + 16 / d`` (the norm). Sinks and the recent window stay dense, as in
SparseSemanticCache (:mod:`.window`).
"""

from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig

from .. import geometry
from ..lloyd_max import codebook_cells, codebook_thresholds, sphere_coordinate_codebook
from ..packing import pack_indices, unpack_indices
from ..rotated_values import haar_rotation
from .window import KINDS, Stored, WindowedQuantizedCache, WindowedQuantizedLayer

__all__ = ["RotatedQuantizer", "RotatedQuantizedCache", "split_bits"]

DEFAULT_FLUSH_TOKENS = 16  # SparseSemanticCache's encode_batch: tokens leave the window in the same steps


def split_bits(bits: float, head_dim: int) -> tuple[int, int]:
    """``(b, wide)``: ``wide`` channels get ``b + 1`` bits and the others ``b``, for ``bits`` per coordinate on
    average; ``bits * head_dim`` must be a whole number of bits."""
    total = bits * head_dim
    if not 1 <= bits <= 7 or abs(total - round(total)) > 1e-9:
        raise ValueError(
            f"bits per coordinate must be between 1 and 7 and bits x head_dim ({head_dim}) a whole number, got {bits}"
        )
    base = math.floor(bits + 1e-9)
    return base, round(total) - base * head_dim


class RotatedQuantizer:
    """Quantize ``[..., d]`` vectors at ``bits`` per coordinate (+ a float16 norm) with rotation ``rotation``."""

    def __init__(self, rotation: torch.Tensor, bits: float):
        self.bits, self.rotation, self.head_dim = bits, rotation, rotation.shape[0]
        base, wide = split_bits(bits, self.head_dim)
        # (name, channels, bits) of the channel sets with any channel: the wide ones first
        self.parts = [(n, c, b) for n, c, b in (("wide", wide, base + 1), ("narrow", self.head_dim - wide, base)) if c]
        self.codebooks = [sphere_coordinate_codebook(self.head_dim, b).to(rotation.device) for _, _, b in self.parts]
        self.thresholds = [codebook_thresholds(c) for c in self.codebooks]

    def to(self, device: torch.device) -> RotatedQuantizer:
        return self if self.rotation.device == device else RotatedQuantizer(self.rotation.to(device), self.bits)

    def quantize(self, x: torch.Tensor) -> Stored:
        """``x [..., d]`` -> ``norm`` (float16 ``[..., 1]``) and packed ``uint8`` codes of the wide and the narrow
        channels (``wide``, ``narrow``: ``[..., ceil(channels x bits / 8)]``; a set without channels is left out)."""
        x = x.float()
        norm = x.norm(dim=-1, keepdim=True)
        rotated = (x / norm.clamp_min(torch.finfo(torch.float32).tiny)) @ self.rotation.T
        stored = {"norm": norm.half()}
        channels = rotated.split([c for _, c, _ in self.parts], dim=-1)
        for (name, _, bits), part, thresholds in zip(self.parts, channels, self.thresholds, strict=True):
            stored[name] = pack_indices(codebook_cells(part, thresholds), 1 << bits)
        return stored

    def dequantize(self, stored: Stored) -> torch.Tensor:
        """The float32 ``[..., d]`` vectors that :meth:`quantize` stored."""
        parts = [
            codebook[unpack_indices(stored[name], channels, 1 << bits)]
            for (name, channels, bits), codebook in zip(self.parts, self.codebooks, strict=True)
        ]
        return (torch.cat(parts, dim=-1) @ self.rotation) * stored["norm"].float()

    def tensors(self) -> list[torch.Tensor]:
        return [self.rotation, *self.codebooks]


class RotatedQuantizedLayer(WindowedQuantizedLayer):
    """One layer: a :class:`RotatedQuantizer` per kind, with its own rotation."""

    def __init__(self, quantizers: dict[str, RotatedQuantizer], **window):
        super().__init__(**window)
        self.quantizers = quantizers

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.quantizers = {kind: quantizer.to(self.device) for kind, quantizer in self.quantizers.items()}

    def quantize(self, kind: str, states: torch.Tensor) -> Stored:
        return self.quantizers[kind].quantize(states)

    def dequantize(self, kind: str, stored: Stored) -> torch.Tensor:
        return self.quantizers[kind].dequantize(stored)

    def fixed_tensors(self) -> list[torch.Tensor]:
        return [t for kind in KINDS for t in self.quantizers[kind].tensors()]


class RotatedQuantizedCache(WindowedQuantizedCache):
    """Keys and values of every full-attention layer stored at ``bits`` per coordinate by a
    :class:`RotatedQuantizer` (rotations drawn from ``seed``, one per layer and kind), the first
    ``num_sink_tokens`` and the last ``residual_length`` tokens dense; tokens leave the window
    ``flush_tokens`` at a time."""

    def __init__(
        self,
        config: PretrainedConfig,
        bits: float,
        *,
        seed: int = 0,
        residual_length: int = 64,
        num_sink_tokens: int = 4,
        flush_tokens: int = DEFAULT_FLUSH_TOKENS,
    ):
        head_dim = geometry.head_dim(config.get_text_config())
        split_bits(bits, head_dim)  # refuse a bad rate before anything is built
        self.bits, self.seed = bits, seed
        generator = torch.Generator().manual_seed(seed)
        window = dict(residual_length=residual_length, num_sink_tokens=num_sink_tokens, flush_tokens=flush_tokens)

        def make_layer(_: int) -> RotatedQuantizedLayer:  # layers are made in order: rotations follow the seed
            quantizers = {kind: RotatedQuantizer(haar_rotation(head_dim, generator), bits) for kind in KINDS}
            return RotatedQuantizedLayer(quantizers, **window)

        super().__init__(make_layer, config)
