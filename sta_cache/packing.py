"""Bit-packing: k atom indices of ceil(log2 N) bits each in ceil(k * bits / 8) bytes, and coefficients as b-bit
level codes on a float8 scale per vector."""

from __future__ import annotations

import math

import torch

from .kernels.reference import LEVEL_SCALE_DTYPE


def index_bits(n_atoms: int) -> int:
    return max(1, math.ceil(math.log2(n_atoms)))


def packed_bytes(k: int, n_atoms: int) -> int:
    return math.ceil(k * index_bits(n_atoms) / 8)


def pack_indices(indices: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """``indices [..., k]`` (values < n_atoms) -> ``uint8 [..., packed_bytes(k, n_atoms)]``, little-endian bits."""
    bits = index_bits(n_atoms)
    k = indices.shape[-1]
    if bits <= 8 or bits % 2 == 0:
        return _pack_in_words(indices, bits)
    shifts = torch.arange(bits, device=indices.device)
    stream = ((indices.long().unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., k * bits]
    n_bytes = packed_bytes(k, n_atoms)
    stream = torch.nn.functional.pad(stream, (0, n_bytes * 8 - k * bits))
    weights = 1 << torch.arange(8, device=indices.device)
    return (stream.view(*indices.shape[:-1], n_bytes, 8) * weights).sum(-1).to(torch.uint8)


def _pack_in_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_indices` for codes of at most 8 bits, or an even number up to 16: every 8 (or 4) codes fill
    ``bits`` (or ``bits / 2``) whole bytes, so each group is joined into one int64 by shifts and cut into bytes (4x
    faster than going bit by bit; rotated values pack 64 codes per vector)."""
    k = codes.shape[-1]
    per_word = 8 if bits <= 8 else 4
    groups = -(-k // per_word)
    padded = torch.nn.functional.pad(codes.long(), (0, groups * per_word - k))
    padded = padded.view(*codes.shape[:-1], groups, per_word)
    words = (padded << (torch.arange(per_word, device=codes.device) * bits)).sum(-1, keepdim=True)
    grouped = (words >> (torch.arange(per_word * bits // 8, device=codes.device) * 8)) & 255
    return grouped.to(torch.uint8).flatten(-2)[..., : math.ceil(k * bits / 8)]


def unpack_indices(packed: torch.Tensor, k: int, n_atoms: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices` -> ``int64 [..., k]``. Index ``i`` starts at bit ``i * bits``: the three
    bytes from its first one are gathered in one ``index_select``, joined into an int32 and shifted (this runs on
    every decode step; about 2.5x faster than unpacking bit by bit)."""
    bits = index_bits(n_atoms)
    if bits > 16:
        raise ValueError(f"packed indices hold at most 16 bits, N={n_atoms} needs {bits}")
    start = torch.arange(k, device=packed.device) * bits
    first, shift = start // 8, (start % 8).int()
    last = packed.shape[-1] - 1
    # bytes past the end only feed bits above the index, which the mask drops
    spans = torch.stack([first, (first + 1).clamp(max=last), (first + 2).clamp(max=last)], dim=-1).reshape(-1)
    data = packed.index_select(-1, spans).view(*packed.shape[:-1], k, 3).int()
    joined = data[..., 0] | (data[..., 1] << 8) | (data[..., 2] << 16)
    return ((joined >> shift) & ((1 << bits) - 1)).long()


# Coefficients as levels: each vector's k coefficients as b-bit codes, each standing for a value of a table of 2^b
# (signed integers for the coefficients of atoms, a Lloyd-Max codebook for rotated values), times one float8 scale,
# in one uint8 row per vector: the scale's byte, then the codes bit-packed as indices are.
LEVEL_BITS = range(2, 9)


def largest_level(bits: int) -> int:
    """The largest |level| of ``bits``-bit levels, 2^(bits-1) - 1; levels are stored plus it."""
    return (1 << (bits - 1)) - 1


def uniform_levels(bits: int) -> torch.Tensor:
    """The values of ``bits``-bit level codes for :func:`pack_levels`: code u stands for u - (2^(bits-1) - 1)."""
    return torch.arange(1 << bits, dtype=torch.float32) - largest_level(bits)


def level_row_bytes(k: int, bits: int) -> int:
    """Bytes of one vector's ``k`` coefficients at ``bits`` bits: the scale byte and the packed levels."""
    return 1 + math.ceil(k * bits / 8)


def pack_level_rows(scale: torch.Tensor, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``scale [..., 1]`` (float8_e4m3) and level ``codes [..., k]`` (< 2^bits) -> ``uint8 [..., level_row_bytes(k,
    bits)]``."""
    return torch.cat([scale.view(torch.uint8), pack_indices(codes, 1 << bits)], dim=-1)


def unpack_level_rows(rows: torch.Tensor, k: int, level_values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_level_rows` -> float32 ``[..., k]``: the scale times the value of each code."""
    scale = rows[..., :1].contiguous().view(LEVEL_SCALE_DTYPE).float()
    codes = unpack_indices(rows[..., 1:], k, level_values.numel())
    return level_values.to(rows.device)[codes] * scale


def pack_levels(coefficients: torch.Tensor, bits: int) -> torch.Tensor:
    """``coefficients [..., k]`` -> ``uint8 [..., level_row_bytes(k, bits)]``: the scale (the largest |c| /
    (2^(bits-1) - 1), rounded up to a float8_e4m3 so that no coefficient clips, at most its 448) and each
    coefficient / scale rounded to a level in [-(2^(bits-1) - 1), 2^(bits-1) - 1], stored plus 2^(bits-1) - 1.
    Coefficients beyond 448 levels clip: :func:`levels_clip` says when."""
    if bits not in LEVEL_BITS:
        raise ValueError(f"coefficient levels take 2 to 8 bits, got {bits}")
    top = largest_level(bits)
    limit = torch.finfo(LEVEL_SCALE_DTYPE).max
    exact = (coefficients.float().abs().amax(-1, keepdim=True) / top).clamp(max=limit)
    scale = exact.to(LEVEL_SCALE_DTYPE)
    short = scale.float() < exact  # rounded down: the next float8 up (positive bit patterns are ordered)
    scale = torch.where(short, (scale.view(torch.uint8) + 1).view(LEVEL_SCALE_DTYPE), scale)
    step = scale.float()
    levels = torch.where(step > 0, coefficients.float() / torch.where(step > 0, step, 1.0), 0.0)
    levels = levels.round().clamp(-top, top).long() + top
    return pack_level_rows(scale, levels, bits)


def levels_clip(coefficients: torch.Tensor, bits: int) -> bool:
    """Whether :func:`pack_levels` clips some of ``coefficients`` (a scale beyond float8's largest)."""
    top = largest_level(bits)
    return bool((coefficients.float().abs() > top * torch.finfo(LEVEL_SCALE_DTYPE).max).any())


def unpack_levels(rows: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_levels` -> float32 ``[..., k]``."""
    return unpack_level_rows(rows, k, uniform_levels(bits))
