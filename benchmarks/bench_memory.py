"""Bytes per token of SparseSemanticCache against an fp16 DynamicCache, from the real stored tensors.

Fills every layer of a cache with a given model geometry to a context length (sinks + codes + window) and reads
``memory_footprint()``. No model runs, so head_dim 128 geometries
(Llama-3-8B: 32 layers x 8 KV heads) are measured without the weights.

    python benchmarks/bench_memory.py --context 4096
"""

from __future__ import annotations

import argparse

import torch

from sta_cache import KVDictionary, KVDictionaryConfig, SparseSemanticCache
from sta_cache.layer import index_dtype
from sta_cache.packing import pack_indices

GEOMETRIES = {
    "SmolLM2-135M (d=64)": (30, 3, 64),
    "Llama-3-8B (d=128)": (32, 8, 128),
}
STORAGE = {
    "fp16 coefficients, int16 indices": {},
    "fp8 coefficients, int16 indices": {"coefficient_dtype": torch.float8_e4m3fn},
    "fp8 coefficients, packed 10-bit indices": {"coefficient_dtype": torch.float8_e4m3fn, "pack_indices": True},
}


def fill_sparse(cache: SparseSemanticCache, heads: int, d: int, length: int, dtype=torch.float32) -> None:
    """Put ``length`` tokens in every layer: sinks, random valid codes, a full window — the layout the cache
    reaches after encoding, without paying for the encoder (bytes and attention cost do not depend on the codes)."""
    for layer_idx, layer in enumerate(cache.layers):
        window = min(length, layer.residual_length)
        states = torch.randn(1, heads, window, d, dtype=dtype)
        layer.lazy_initialization(states, states)
        sinks = min(layer.num_sink_tokens, length - window)
        compressed = length - window - sinks
        layer.sink_keys = layer.sink_values = torch.randn(1, heads, sinks, d, dtype=dtype)
        layer.sink_positions = torch.arange(sinks).unsqueeze(0)
        layer.sink_real = torch.ones(1, sinks, dtype=torch.bool)
        layer.sinks_settled = True
        for kind in ("key", "value"):
            k = layer.k[kind]
            indices = torch.randint(0, layer.n_atoms, (1, heads, compressed, k))
            stored = pack_indices(indices, layer.n_atoms) if layer.pack_indices else indices.to(index_dtype(layer.n_atoms))
            layer.codes[kind] = (stored, torch.randn(1, heads, compressed, k).to(layer.coefficient_dtype))
        if layer.key_positions is not None:
            layer.key_positions = torch.arange(sinks, sinks + compressed, dtype=torch.int32).unsqueeze(0)
        layer.keys = layer.values = states
        layer.window_positions = torch.arange(length - window, length).unsqueeze(0)
        layer.window_real = torch.ones(1, window, dtype=torch.bool)
        assert layer.get_seq_length() == length, layer_idx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--n-atoms", type=int, default=1024)
    parser.add_argument("--k-key", type=int, default=8)
    parser.add_argument("--k-value", type=int, default=16)
    args = parser.parse_args()
    print(f"context {args.context}, k {args.k_key}/{args.k_value}, N {args.n_atoms}, window 64 + 4 sinks, batch 1\n")
    print("| model geometry | storage | codes + dense bytes | fp16 DynamicCache bytes | x smaller | dictionaries | break-even tokens |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (layers, heads, d) in GEOMETRIES.items():
        meta = KVDictionaryConfig(base_model=name, num_layers=layers, layer_indices=list(range(layers)),
                                  num_kv_heads=heads, head_dim=d, n_atoms=args.n_atoms, k_key=args.k_key,
                                  k_value=args.k_value, encoder="omp")  # fmt: skip
        dictionary = KVDictionary(meta)
        for label, options in STORAGE.items():
            cache = SparseSemanticCache(dictionary, backend="torch", **options)
            fill_sparse(cache, heads, d, args.context, dtype=torch.float16)
            memory = cache.memory_footprint()
            stored = memory["code_bytes"] + memory["dense_bytes"]
            print(f"| {name} | {label} | {stored:,} | {memory['dynamic_cache_bytes']:,} | "
                  f"{memory['compression_ratio']:.2f} | {memory['dictionary_bytes'] / 2**20:.1f} MiB (fp32) | "
                  f"{memory['break_even_tokens']} |")


if __name__ == "__main__":
    main()
