"""One layer's decode attention on the CPU, SmolLM2 shapes: dense sdpa against the cache's two CPU backends.

``torch`` is the PyTorch reference path (CSR matmuls and an atom-space scatter); ``cpu`` the fused C kernels
(kernels/cpu_kernels.c). Both attend over 4 sinks + the codes + a 64-token window, for post-RoPE codes (scores
gathered from one q . D^T product) and pre-RoPE codes (keys rebuilt, rotated and dotted), with the default
storage (int16 indices, float32 coefficients) and the memory setting (10-bit packed indices, fp8 coefficients).
sdpa attends over dense float32 keys and values of the same length. Each backend's output is checked against the
reference before it is timed. Milliseconds per call (median of ``--reps``).

    python benchmarks/bench_attention_cpu.py --contexts 1024,4096,16384,32768 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sta_cache.kernels import dispatch
from sta_cache.kernels.reference import CompressedKV
from sta_cache.packing import index_bits, pack_indices

KV_HEADS, GROUPS, HEAD_DIM, N_ATOMS, K_KEY, K_VALUE, SINKS, WINDOW = 3, 3, 64, 1024, 8, 16, 4, 64


def make_kv(context: int, pre_rope: bool, compact: bool) -> CompressedKV:
    """Random codes for ``context`` tokens (sinks and window included), stored as the cache would store them."""
    compressed = context - SINKS - WINDOW

    def codes(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.rand(KV_HEADS * compressed, N_ATOMS).topk(k, dim=-1).indices.view(1, KV_HEADS, compressed, k)
        coefficients = torch.randn(1, KV_HEADS, compressed, k) * k**-0.5
        if compact:
            return pack_indices(indices, N_ATOMS), coefficients.to(torch.float8_e4m3fn)
        return indices.to(torch.int16), coefficients

    (key_indices, key_coefficients), (value_indices, value_coefficients) = codes(K_KEY), codes(K_VALUE)
    dense = lambda n: torch.randn(1, KV_HEADS, n, HEAD_DIM)  # noqa: E731
    inv_freq = 1.0 / (100_000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    return CompressedKV(
        sink_keys=dense(SINKS),
        sink_values=dense(SINKS),
        key_indices=key_indices,
        key_coefficients=key_coefficients,
        value_indices=value_indices,
        value_coefficients=value_coefficients,
        window_keys=dense(WINDOW),
        window_values=dense(WINDOW),
        key_atoms=torch.randn(1, N_ATOMS, HEAD_DIM) * 0.3,
        key_bias=torch.randn(1, HEAD_DIM) * 0.1,
        value_atoms=torch.randn(1, N_ATOMS, HEAD_DIM) * 0.3,
        value_bias=torch.randn(1, HEAD_DIM) * 0.1,
        key_positions=torch.arange(SINKS, SINKS + compressed, dtype=torch.int32)[None] if pre_rope else None,
        rope_inv_freq=inv_freq if pre_rope else None,
        packed_index_bits=index_bits(N_ATOMS) if compact else 0,
    )


def unpacked(kv: CompressedKV) -> CompressedKV:
    """The same codes as the PyTorch path reads them (it unpacks indices first, and pays for that each step)."""
    if not kv.packed_index_bits:
        return kv
    from sta_cache.packing import unpack_indices

    return CompressedKV(
        **{
            **vars(kv),
            "packed_index_bits": 0,
            "key_indices": unpack_indices(kv.key_indices, K_KEY, N_ATOMS),
            "value_indices": unpack_indices(kv.value_indices, K_VALUE, N_ATOMS),
        }
    )


def milliseconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="1024,4096,16384,32768")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    scale = HEAD_DIM**-0.5
    query = torch.randn(1, KV_HEADS * GROUPS, 1, HEAD_DIM)
    rows: dict[str, list[float]] = {}
    for context in contexts:
        keys, values = torch.randn(1, KV_HEADS, context, HEAD_DIM), torch.randn(1, KV_HEADS, context, HEAD_DIM)

        def dense(keys=keys, values=values):
            return F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)

        rows.setdefault("sdpa, dense fp32", []).append(milliseconds(dense, args.reps))
        for pre_rope in (False, True):
            for compact in (False, True):
                kv = make_kv(context, pre_rope, compact)
                expected = dispatch.sparse_attention(query, unpacked(kv), None, scale, None, "torch")
                got = dispatch.sparse_attention(query, kv, None, scale, None, "cpu")
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
                storage = "fp8 + packed" if compact else "int16 + fp32"
                space = "pre-RoPE" if pre_rope else "post-RoPE"
                for backend in ("torch", "cpu"):

                    def attend(kv=kv, backend=backend):  # the PyTorch path unpacks packed indices on every step
                        view = unpacked(kv) if backend == "torch" else kv
                        return dispatch.sparse_attention(query, view, None, scale, None, backend)

                    rows.setdefault(f"STA {space}, {storage}, {backend}", []).append(milliseconds(attend, args.reps))
        print(f"context {context} done", flush=True)
    print(f"\n| one layer, ms (median of {args.reps}) | " + " | ".join(f"{c // 1024}k" for c in contexts) + " |")
    print("| --- |" + " ---: |" * len(contexts))
    for name, times in rows.items():
        base = rows["sdpa, dense fp32"]
        print(f"| {name} | " + " | ".join(f"{t:.2f} (×{t / b:.2f})" for t, b in zip(times, base, strict=True)) + " |")


if __name__ == "__main__":
    main()
