"""Bytes per tensor-parallel rank of SparseSemanticCache against a bf16 DynamicCache, for Llama-3-8B / 70B-sized
models at long contexts: the README's "Scaling out" table.

Under tensor parallelism a rank holds the KV heads of its share (8 KV heads over TP ranks; KV heads stop dividing at
TP = 8). Every attention layer of these models has the same geometry, so one layer is filled to the context with
the rank's heads (sinks + random valid codes + a full window, as ``bench_memory.py`` fills them; bytes do not
depend on the codes) and measured with ``memory_footprint()`` (real tensor storages), then multiplied by the number
of layers. The dictionary per rank is measured the same way: the layer's device copy of the decoder atoms (N = 1024,
fp32, OMP-coded), a rank's slice of a per-head dictionary or the whole of a shared one.

    python benchmarks/bench_scaling.py            # the table, about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse

import torch
from bench_memory import STORAGE, fill_sparse

from sta_cache import KVDictionary, KVDictionaryConfig, SparseSemanticCache
from sta_cache.distributed import Ranks

MODELS = {"Llama-3-8B": 32, "Llama-3-70B": 80}  # layers; both have 8 KV heads of head_dim 128
KV_HEADS, HEAD_DIM = 8, 128
STORAGES = ("fp16 coefficients, int16 indices", "fp8 coefficients, packed 10-bit indices")


def one_layer(per_head: bool, n_atoms: int) -> KVDictionary:
    """A one-layer dictionary of the models' attention geometry."""
    meta = KVDictionaryConfig(
        base_model="Llama-3 geometry",
        num_layers=1,
        layer_indices=[0],
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        n_atoms=n_atoms,
        per_head=per_head,
        encoder="omp",
    )
    return KVDictionary(meta)


def rank_layer_bytes(dictionary: KVDictionary, tp: int, context: int, storage: str) -> dict:
    """``memory_footprint()`` of one layer as rank 0 of ``tp`` holds it at ``context`` tokens (bf16 model)."""
    cache = SparseSemanticCache(dictionary, backend="torch", **STORAGE[storage])
    for layer in cache.sparse_layers:
        layer.ranks = Ranks(0, tp)  # as in a tensor-parallel group of tp: the layer codes heads 0 .. 8/tp - 1
    fill_sparse(cache, KV_HEADS // tp, HEAD_DIM, context, dtype=torch.bfloat16)
    return cache.memory_footprint()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072], help="context lengths in tokens")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8], help="tensor-parallel degrees (ranks)")
    parser.add_argument("--n-atoms", type=int, default=1024, help="atoms per dictionary (N)")
    args = parser.parse_args()
    dictionaries = {per_head: one_layer(per_head, args.n_atoms) for per_head in (False, True)}
    print(
        f"Per rank, batch 1, k 8/16, N {args.n_atoms}, window 64 + 4 sinks, bf16 model; "
        "STA = codes + dense sinks/window (dictionaries apart)\n"
    )
    print(
        "| model | context | TP | DynamicCache bf16 GiB | STA bf16 coef., int16 idx GiB "
        "| STA fp8 coef., packed idx GiB | × smaller (fp8 + packed) | dictionary shared MiB | dictionary per-head MiB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model, layers in MODELS.items():
        for context in args.contexts:
            for tp in args.tp:
                footprints = [rank_layer_bytes(dictionaries[False], tp, context, s) for s in STORAGES]
                stored = [layers * (f["code_bytes"] + f["dense_bytes"]) for f in footprints]
                dynamic = layers * footprints[0]["dynamic_cache_bytes"]
                shared = layers * footprints[0]["dictionary_bytes"]
                per_head = layers * rank_layer_bytes(dictionaries[True], tp, 1, STORAGES[0])["dictionary_bytes"]
                print(
                    f"| {model} | {context:,} | {tp} | {gib(dynamic)} | {gib(stored[0])} | {gib(stored[1])} | "
                    f"{dynamic / stored[1]:.2f} | {mib(shared)} | {mib(per_head)} |"
                )


if __name__ == "__main__":
    main()
