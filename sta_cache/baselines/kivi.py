"""KIVI-style asymmetric integer quantization (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for
KV Cache", ICML 2024) as a transformers ``Cache``: the standard per-channel-key / per-token-value reference.

* keys: per channel, in groups of ``group`` consecutive tokens (a key channel's outliers persist across tokens);
* values: per token, in groups of ``group`` consecutive channels;
* each group: ``bits``-bit codes ``round((x - min) / scale)`` with ``scale = (max - min) / (2**bits - 1)``, the
  scale and the zero point (``min``) stored in float16 (codes computed against the float16 values, so that
  reading back is exact arithmetic); codes packed into ``uint8`` bytes.

Stored bits per element: ``bits + 32 / group`` for both kinds. KIVI's full-precision residual is the dense recent
window of ``residual_length`` tokens; keys need whole token groups, so tokens leave the window ``group`` at a
time (the window holds ``residual_length`` to ``residual_length + group - 1`` dense tokens); the first
``num_sink_tokens`` stay dense, as in SparseSemanticCache (:mod:`.window`).
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from .. import geometry
from ..packing import pack_indices, unpack_indices
from .window import Stored, WindowedQuantizedCache, WindowedQuantizedLayer

__all__ = ["KiviCache", "dequantize_groups", "quantize_groups"]

DEFAULT_GROUP = 32  # KIVI's group size


def quantize_groups(x: torch.Tensor, bits: int) -> Stored:
    """Asymmetric min/max quantization of ``x [..., g]`` over its last dim (one group per leading index) ->
    ``codes`` (``uint8``, packed, ``[..., ceil(g bits / 8)]``), ``scale`` and ``zero`` (float16, ``[...]``)."""
    x = x.float()
    levels = (1 << bits) - 1
    zero = x.amin(dim=-1).half()
    scale = ((x.amax(dim=-1) - zero.float()) / levels).half()
    step = scale.float().unsqueeze(-1)
    codes = torch.where(step > 0, (x - zero.float().unsqueeze(-1)) / step.clamp_min(1e-30), 0.0)
    codes = codes.round().clamp(0, levels).long()
    return {"codes": pack_indices(codes, levels + 1), "scale": scale, "zero": zero}


def dequantize_groups(stored: Stored, group: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_groups` -> float32 ``[..., group]``."""
    codes = unpack_indices(stored["codes"], group, 1 << bits).float()
    return codes * stored["scale"].float().unsqueeze(-1) + stored["zero"].float().unsqueeze(-1)


class KiviLayer(WindowedQuantizedLayer):
    """One layer: keys per channel over token groups, values per token over channel groups."""

    def __init__(self, bits: int, group: int, **window):
        super().__init__(group=group, flush_tokens=group, **window)
        self.bits = bits

    def quantize(self, kind: str, states: torch.Tensor) -> Stored:
        batch, heads, tokens, head_dim = states.shape
        g = self.group
        if kind == "key":  # [B, H, n/g, d, g]: each channel of each token group
            grouped = states.reshape(batch, heads, tokens // g, g, head_dim).transpose(-1, -2)
        else:  # [B, H, n, d/g, g]: each channel group of each token
            grouped = states.reshape(batch, heads, tokens, head_dim // g, g)
        return quantize_groups(grouped, self.bits)

    def dequantize(self, kind: str, stored: Stored) -> torch.Tensor:
        x = dequantize_groups(stored, self.group, self.bits)
        batch, heads = x.shape[:2]
        if kind == "key":
            return x.transpose(-1, -2).reshape(batch, heads, -1, x.shape[-2])
        return x.reshape(batch, heads, x.shape[2], -1)

    def fixed_tensors(self) -> list[torch.Tensor]:
        return []


class KiviCache(WindowedQuantizedCache):
    """KIVI-``bits`` (2 in the paper) with groups of ``group`` tokens (keys) / channels (values), for every
    full-attention layer; ``head_dim`` must be a multiple of ``group``."""

    def __init__(
        self,
        config: PretrainedConfig,
        bits: int = 2,
        *,
        group: int = DEFAULT_GROUP,
        residual_length: int = 64,
        num_sink_tokens: int = 4,
    ):
        head_dim = geometry.head_dim(config.get_text_config())
        if not 1 <= bits <= 8 or group < 1 or head_dim % group:
            raise ValueError(
                f"KIVI needs 1 <= bits <= 8 and a group size dividing head_dim ({head_dim}); got bits {bits}, "
                f"group {group}"
            )
        self.bits, self.group = bits, group
        super().__init__(
            lambda _: KiviLayer(bits, group, residual_length=residual_length, num_sink_tokens=num_sink_tokens),
            config,
        )
