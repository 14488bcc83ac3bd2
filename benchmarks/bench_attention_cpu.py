"""One layer's decode attention on the CPU, SmolLM2 shapes: dense sdpa against the cache's two CPU backends.

``torch`` is the PyTorch reference path (CSR matmuls and an atom-space scatter); ``cpu`` the fused C kernels
(kernels/cpu_kernels.c). Both attend over 4 sinks + the codes + a 64-token window, for post-RoPE codes (scores
gathered from one q . D^T product) and pre-RoPE codes (keys rebuilt, rotated and dotted), with the default
storage (int16 indices, float32 coefficients), the memory setting (10-bit packed indices, fp8 coefficients),
``coefficient_bits=4`` (packed indices, 4-bit coefficient levels on a float8 scale per vector) and ``value_bits=3``
(keys as in the memory setting, values rotated and quantized to 3 bits per coordinate: 64 codes per value).
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
from sta_cache.packing import (
    index_bits,
    pack_indices,
    pack_levels,
    uniform_levels,
    unpack_indices,
    unpack_level_rows,
)
from sta_cache.rotated_values import RotatedValueCoder

KV_HEADS, GROUPS, HEAD_DIM, N_ATOMS, K_KEY, K_VALUE, SINKS, WINDOW = 3, 3, 64, 1024, 8, 16, 4, 64


# default, memory setting, coefficient_bits=4, value_bits=3
STORAGES = ("int16 + fp32", "fp8 + packed", "4-bit levels + packed", "fp8 + packed keys, 3-bit rotated values")
ROTATED = STORAGES[-1]


def make_kv(context: int, pre_rope: bool, storage: str) -> CompressedKV:
    """Random codes for ``context`` tokens (sinks and window included), stored as the cache would store them."""
    compressed = context - SINKS - WINDOW

    def codes(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.rand(KV_HEADS * compressed, N_ATOMS).topk(k, dim=-1).indices.view(1, KV_HEADS, compressed, k)
        coefficients = torch.randn(1, KV_HEADS, compressed, k) * k**-0.5
        if storage in ("fp8 + packed", ROTATED):
            return pack_indices(indices, N_ATOMS), coefficients.to(torch.float8_e4m3fn)
        if storage == "4-bit levels + packed":
            return pack_indices(indices, N_ATOMS), pack_levels(coefficients, 4)
        return indices.to(torch.int16), coefficients

    (key_indices, key_coefficients), (value_indices, value_coefficients) = codes(K_KEY), codes(K_VALUE)
    dense = lambda n: torch.randn(1, KV_HEADS, n, HEAD_DIM)  # noqa: E731
    value_atoms, k_value, value_levels = torch.randn(1, N_ATOMS, HEAD_DIM) * 0.3, K_VALUE, None
    levels = uniform_levels(4) if storage == "4-bit levels + packed" else None
    if storage == ROTATED:
        coder = RotatedValueCoder(HEAD_DIM, 3, layer_idx=0, device=torch.device("cpu"))
        value_coefficients, _ = coder.encode(dense(compressed))
        value_indices = torch.zeros(1, KV_HEADS, compressed, 0, dtype=torch.uint8)
        value_atoms, k_value, value_levels = coder.rotation[None], HEAD_DIM, coder.codebook
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
        value_atoms=value_atoms,
        value_bias=torch.randn(1, HEAD_DIM) * 0.1,
        key_positions=torch.arange(SINKS, SINKS + compressed, dtype=torch.int32)[None] if pre_rope else None,
        rope_inv_freq=inv_freq if pre_rope else None,
        packed_index_bits=0 if storage == "int16 + fp32" else index_bits(N_ATOMS),
        key_levels=levels,
        value_levels=levels if value_levels is None else value_levels,
        k_key=K_KEY,
        k_value=k_value,
    )


def unpacked(kv: CompressedKV) -> CompressedKV:
    """The same codes as the PyTorch path reads them (it unpacks indices and levels first, and pays for that each
    step)."""
    fields = dict(vars(kv), packed_index_bits=0, key_levels=None, value_levels=None)
    if kv.packed_index_bits:
        fields["key_indices"] = unpack_indices(kv.key_indices, K_KEY, N_ATOMS)
    if kv.value_indices.shape[-1] == 0:  # rotated values: slot j is atom j
        fields["value_indices"] = torch.arange(HEAD_DIM).expand(*kv.value_indices.shape[:3], -1)
    elif kv.packed_index_bits:
        fields["value_indices"] = unpack_indices(kv.value_indices, K_VALUE, N_ATOMS)
    for kind, levels in (("key", kv.key_levels), ("value", kv.value_levels)):
        if levels is not None:
            fields[f"{kind}_coefficients"] = unpack_level_rows(getattr(kv, f"{kind}_coefficients"), kv.k(kind), levels)
    return CompressedKV(**fields)


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
    parser.add_argument("--contexts", default="1024,4096,16384,32768", help="cache lengths in tokens, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenMP threads")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per cell; the table gives their median")
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
            for storage in STORAGES:
                kv = make_kv(context, pre_rope, storage)
                expected = dispatch.sparse_attention(query, unpacked(kv), None, scale, None, "torch")
                got = dispatch.sparse_attention(query, kv, None, scale, None, "cpu")
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
                space = "pre-RoPE" if pre_rope else "post-RoPE"
                for backend in ("torch", "cpu"):

                    def attend(kv=kv, backend=backend):  # the PyTorch path unpacks on every step
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
