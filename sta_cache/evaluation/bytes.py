"""The bytes a cache really stores, counted from its tensors, for any transformers cache.

``sta-cache eval`` compares SparseSemanticCache with DynamicCache and transformers' QuantizedCache backends on these
numbers; :meth:`SparseSemanticCache.memory_footprint` reports the same code and dense bytes for our cache alone.
"""

from __future__ import annotations

from transformers.cache_utils import BaseQuantizedLayer, Cache

from ..layer import SparseSemanticLayer
from ..memory import storage_bytes

__all__ = ["cache_bytes"]


def cache_bytes(cache: Cache) -> dict:
    """The bytes a cache holds, from its real stored tensors, per category and per token.

    * ``SparseSemanticLayer``: ``codes`` = atom indices + coefficients (+ positions of pre-RoPE codes);
      ``dense`` = sinks + recent window + their position/padding bookkeeping (``layer.memory()``). Tokens past the
      window are encoded first (``cache.flush()``), as the next step would do. The dictionaries are a fixed cost
      shared by every sequence: reported apart in ``dictionary``, never in the per-token figure.
    * ``QuantizedLayer`` (quanto / hqq / fp8): ``quantized`` = every tensor inside ``_quantized_keys`` and
      ``_quantized_values`` (packed integer data, scales, zero-points/shifts; see :func:`memory.storage_bytes`);
      ``residual`` = the dense not-yet-quantized ``keys``/``values``.
    * any other layer (DynamicCache): ``dense`` = ``keys`` + ``values``.

    ``tokens`` is the cached sequence length; ``per_token`` = all stored bytes / tokens (batch of one assumed).
    ``marginal_per_token`` is the cost of one more token far from the window: code bytes per compressed token,
    quantized bytes per quantized token, dense bytes per token otherwise.
    """
    if hasattr(cache, "flush"):
        cache.flush()
    totals = {"codes": 0, "dense": 0, "quantized": 0, "residual": 0}
    compressed_tokens = quantized_tokens = 0
    tokens = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        tokens = max(tokens, layer.get_seq_length())
        if isinstance(layer, SparseSemanticLayer):
            memory = layer.memory()
            totals["codes"] += memory["code_bytes"]
            totals["dense"] += memory["dense_bytes"]
            compressed_tokens = max(compressed_tokens, layer.num_compressed)
        elif isinstance(layer, BaseQuantizedLayer):
            totals["quantized"] += storage_bytes([layer._quantized_keys, layer._quantized_values])
            totals["residual"] += storage_bytes([layer.keys, layer.values])
            residual = layer.keys.shape[-2] if layer.keys is not None and layer.keys.dim() == 4 else 0
            quantized_tokens = max(quantized_tokens, layer.get_seq_length() - residual)
        else:
            totals["dense"] += storage_bytes([layer.keys, layer.values])
    total = sum(totals.values())
    if compressed_tokens:
        marginal = totals["codes"] / compressed_tokens
    elif quantized_tokens:
        marginal = totals["quantized"] / quantized_tokens
    else:
        marginal = total / tokens if tokens else float("nan")
    # what the cache's layers hold on the device (a matching-pursuit cache keeps no encoder weights)
    dictionary = cache.memory_footprint()["dictionary_bytes"] if hasattr(cache, "memory_footprint") else 0
    return {
        "total": total,
        **totals,
        "tokens": tokens,
        "per_token": total / tokens if tokens else float("nan"),
        "marginal_per_token": marginal,
        "dictionary": dictionary,
    }
