"""The bytes a cache really stores, counted from its tensors, for any transformers cache, and the bits per element
that ``sta-cache eval`` compares caches by.

``sta-cache eval`` compares SparseSemanticCache with DynamicCache, transformers' QuantizedCache backends and the
quantizer baselines of :mod:`sta_cache.baselines` on these numbers; :meth:`SparseSemanticCache.memory_footprint`
reports the same code and dense bytes for our cache alone.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache

from ..baselines.window import WindowedQuantizedLayer
from ..layer import SparseSemanticLayer
from ..memory import storage_bytes

__all__ = ["amortised_bits_per_element", "cache_bytes"]


def cache_bytes(cache: Cache) -> dict:
    """The bytes a cache holds, from its real stored tensors, per category and per token.

    * ``SparseSemanticLayer`` and the baselines' ``WindowedQuantizedLayer``: ``codes`` = what the compressed tokens
      store (atom indices + coefficients + positions of pre-RoPE codes; packed codes + scales + norms); ``dense``
      = sinks + recent window (+ their position/padding bookkeeping). Tokens past the window are compressed first
      (``cache.flush()``), as the next step would do. Fixed tensors shared by every sequence (STA dictionaries,
      the rotated quantizer's rotations and codebooks) are reported apart in ``dictionary``, never per token.
    * ``QuantizedLayer`` (quanto / hqq / fp8): ``quantized`` = every tensor inside ``_quantized_keys`` and
      ``_quantized_values`` (packed integer data, scales, zero-points/shifts; see :func:`memory.storage_bytes`);
      ``residual`` = the dense not-yet-quantized ``keys``/``values``.
    * any other layer (DynamicCache, sliding-window layers): ``dense`` = ``keys`` + ``values``.

    ``tokens`` is the cached sequence length; ``per_token`` = all stored bytes / tokens (batch of one assumed).
    The compressed tokens' figures: ``marginal_per_token`` (the bytes of one more token far from the window),
    ``bits_per_element`` = 8 x their stored bytes / (tokens x KV heads x head_dim x 2, over the compressing
    layers), ``bytes_per_vector`` (per key or value vector of one head) and ``elements_per_token`` (KV heads x
    head_dim x 2 summed over those layers). The compressed tokens are the codes of STA and the baselines, the
    quantized part of a QuantizedCache; a cache without any (DynamicCache) counts all its dense bytes.
    """
    if hasattr(cache, "flush"):
        cache.flush()
    totals = {"codes": 0, "dense": 0, "quantized": 0, "residual": 0}
    elements = {"codes": 0, "quantized": 0, "dense": 0}  # stored elements behind codes / quantized / dense bytes
    tokens = {"codes": 0, "quantized": 0, "dense": 0}
    length = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        length = max(length, layer.get_seq_length())
        batch, heads, _, head_dim = layer.keys.shape if layer.keys.dim() == 4 else (0, 0, 0, 0)
        if isinstance(layer, (SparseSemanticLayer, WindowedQuantizedLayer)):
            memory = layer.memory()
            totals["codes"] += memory["code_bytes"]
            totals["dense"] += memory["dense_bytes"]
            n, kind = layer.num_compressed, "codes"
        elif isinstance(layer, BaseQuantizedLayer):
            totals["quantized"] += storage_bytes([layer._quantized_keys, layer._quantized_values])
            totals["residual"] += storage_bytes([layer.keys, layer.values])
            batch, heads, _, head_dim = _quantized_shape(layer._quantized_keys)
            n, kind = layer.get_seq_length() - (layer.keys.shape[-2] if layer.keys.dim() == 4 else 0), "quantized"
        else:
            totals["dense"] += storage_bytes([layer.keys, layer.values])
            n, kind = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0, "dense"
        elements[kind] += batch * heads * n * head_dim * 2
        tokens[kind] = max(tokens[kind], n)
    total = sum(totals.values())
    kind = next((k for k in ("codes", "quantized", "dense") if elements[k]), None)
    stored = totals[kind] if kind else 0
    bits = 8 * stored / elements[kind] if kind else float("nan")
    # what the cache's layers hold on the device (a matching-pursuit cache keeps no encoder weights)
    dictionary = cache.memory_footprint()["dictionary_bytes"] if hasattr(cache, "memory_footprint") else 0
    return {
        "total": total,
        **totals,
        "tokens": length,
        "per_token": total / length if length else float("nan"),
        "marginal_per_token": stored / tokens[kind] if kind else float("nan"),
        "bits_per_element": bits,
        "bytes_per_vector": stored / (elements[kind] / head_dim) if kind else float("nan"),
        "elements_per_token": elements[kind] // tokens[kind] if kind else 0,
        "dictionary": dictionary,
    }


def _quantized_shape(quantized) -> torch.Size:
    """``[B, H, T, d]`` of a QuantizedLayer's quantized keys: a quanto ``QTensor`` has the shape it quantized;
    fp8 stores ``(data, scale)`` and hqq ``(packed data, meta)`` with the shape in ``meta``."""
    if isinstance(quantized, tuple):
        data, extra = quantized
        return torch.Size(extra["shape"]) if isinstance(extra, dict) else data.shape
    return quantized.shape


def amortised_bits_per_element(counted: dict, context: int) -> float:
    """``bits_per_element`` of :func:`cache_bytes` with the fixed ``dictionary`` bytes spread over ``context``
    tokens of one sequence (batch 1): what a single sequence of that length pays per element."""
    return counted["bits_per_element"] + 8 * counted["dictionary"] / (context * counted["elements_per_token"])
