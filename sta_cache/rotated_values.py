"""Values by rotation and scalar quantization: the value coder of ``SparseSemanticCache(value_bits=b)``.

Keys route attention, and a few atoms code them better than a scalar quantizer at equal bits; values are payloads
averaged by the attention weights, and there a rotated scalar quantizer in the TurboQuant / PolarQuant style does as
well or better per bit and costs almost nothing to encode (README "Quality" and "Speed"). Each value vector ``x``
(per token and KV head) is stored as

* the codes ``c`` of ``y = R (x - m) / |x - m|`` under the Lloyd-Max codebook of one coordinate of a random unit
  vector (:mod:`.lloyd_max`), ``b`` bits per coordinate, and
* one float8 gain ``g``: the least-squares scale of the codebook values ``q = codebook[c]`` onto ``R (x - m)``,

and read back as ``m + g Σ_j q_j R_j``. That is an atom code whose atoms are the ``d`` rows of ``R``, slot ``j``
holding atom ``j``: the attention kernels read it as any other code (no indices stored), from the same rows of a
float8 scale and packed level codes as coefficient levels (:func:`.packing.pack_level_rows`). ``m`` is the
dictionary's value bias (the mean value vector, which a rotation would spread over every coordinate); ``R`` is a
Haar-random rotation per layer, drawn from the layer's index, so every cache of a model draws the same ones.
"""

from __future__ import annotations

import functools

import torch

from .kernels import cpu_kernels
from .kernels.reference import LEVEL_SCALE_DTYPE
from .lloyd_max import codebook_cells, codebook_thresholds, sphere_coordinate_codebook
from .packing import pack_level_rows

__all__ = ["RotatedValueCoder", "haar_rotation", "layer_rotation"]


def haar_rotation(head_dim: int, generator: torch.Generator) -> torch.Tensor:
    """A ``[d, d]`` orthogonal matrix drawn uniformly (Haar measure): QR of a Gaussian matrix, signs fixed."""
    q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


@functools.cache
def layer_rotation(head_dim: int, layer_idx: int) -> torch.Tensor:
    """The rotation of layer ``layer_idx``'s values: drawn from seed ``layer_idx``; made once per process (every
    cache shares it, and nothing writes into it)."""
    return haar_rotation(head_dim, torch.Generator().manual_seed(layer_idx))


class RotatedValueCoder:
    """One layer's value coder at ``bits`` bits per coordinate: ``rotation [d, d]`` (row j is atom j) and the
    codebook, on ``device``."""

    def __init__(self, head_dim: int, bits: int, layer_idx: int, device: torch.device):
        self.bits = bits
        self.rotation = layer_rotation(head_dim, layer_idx).to(device)
        self.codebook = sphere_coordinate_codebook(head_dim, bits).to(device)
        self.thresholds = codebook_thresholds(self.codebook)

    def encode(self, centred: torch.Tensor, backend: str = "torch") -> tuple[torch.Tensor, bool]:
        """``centred [..., d]`` (values minus the bias) -> ``uint8 [..., level_row_bytes(d, bits)]`` rows, and
        whether some gain was beyond the float8 scale's largest (448) and clamped (that vector is coded short).
        ``backend="cpu"`` finds the cells, gains and packed rows in one C pass (``cpu_kernels.rotated_levels``);
        any other backend in PyTorch, the reference."""
        centred = centred.float()
        rotated = centred @ self.rotation.T  # coordinates on the atoms: centred = rotated @ rotation
        norm = centred.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        in_c = backend == "cpu" and rotated.device.type == "cpu"
        if in_c:
            flat = rotated.reshape(-1, rotated.shape[-1])
            rows, gain = cpu_kernels.rotated_levels(flat, norm.reshape(-1), self.thresholds, self.codebook, self.bits)
            rows, gain = rows.view(*rotated.shape[:-1], -1), gain.view(*rotated.shape[:-1], 1)
        else:
            codes = codebook_cells(rotated / norm, self.thresholds)
            quantized = self.codebook[codes.long()]
            gain = (rotated * quantized).sum(-1, keepdim=True) / (quantized * quantized).sum(-1, keepdim=True)
        limit = torch.finfo(LEVEL_SCALE_DTYPE).max
        clamped = bool((gain > limit).any())
        scale = gain.clamp(max=limit).to(LEVEL_SCALE_DTYPE)  # to the nearest float8
        if in_c:
            rows[..., :1] = scale.view(torch.uint8)
            return rows, clamped
        return pack_level_rows(scale, codes, self.bits), clamped
