"""Decode-step benchmark: STA decode-into-attention and encode-on-append vs dense attention on the same cache shape.

For each (batch, context, head_dim) it times one layer's decode step (one query token, ``Hq`` heads, ``Hkv`` KV
heads) three ways: dense ``scaled_dot_product_attention`` on an uncompressed cache (plus flash-attn if installed),
the PyTorch reference over a ``sinks | codes | window`` cache, and the Triton kernel (GPU only: under the CPU
interpreter a kernel's time means nothing); and the encoders for the step's ``B * Hkv`` new keys and values.

Bytes are the fewest a method must move: dense ``2 * d * dtype bytes`` per token per KV head; STA the dense sinks
and window, ``k * (index + coefficient bytes)`` per coded key and value, and both dictionaries once; encode the
encoder weights once. The byte floor is those bytes at ``--peak-gbps`` (default 3350 GB/s, an H100 SXM, on GPU;
measured copy bandwidth on CPU). Times are medians: ``triton.testing.do_bench`` on GPU, ``time.perf_counter``
otherwise. Writes ``results.json``, ``results.md`` and ``results.png`` into ``--out`` and prints the table last.

    python benchmarks/bench_kernels.py                          # CPU: small contexts, torch paths
    python benchmarks/bench_kernels.py --contexts 1024 32768 131072 --batch 1 4 16   # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sta_cache.kernels import reference
from sta_cache.kernels.reference import CompressedKV

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=[1024, 4096, 32768, 131072] if cuda else [1024, 4096],
        help="cache lengths in tokens",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16] if cuda else [1, 4], help="batch sizes")
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128], help="head dims d")
    p.add_argument("--q-heads", type=int, default=32, help="query heads Hq")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads Hkv (dividing Hq)")
    p.add_argument("--atoms", type=int, default=4096, help="dictionary size N")
    p.add_argument("--k-key", type=int, default=8, help="atoms per coded key")
    p.add_argument("--k-value", type=int, default=16, help="atoms per coded value")
    p.add_argument("--sinks", type=int, default=4, help="dense attention-sink tokens")
    p.add_argument("--window", type=int, default=128, help="dense recent tokens")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float16" if cuda else "float32",
        help="dtype of every tensor: queries, dense keys and values, coefficients, atoms",
    )
    p.add_argument(
        "--peak-gbps",
        type=float,
        default=3350.0 if cuda else None,
        help="peak memory bandwidth for the byte floor (default: H100 on GPU, measured copy on CPU)",
    )
    p.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (median)")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="folder for results.json, .md and .png"
    )
    return p.parse_args()


def median_seconds(fn, device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, reps: int) -> float:
    """Read + write bandwidth of a 256 MB copy: the CPU's stand-in for a datasheet peak."""
    src = torch.empty(64 << 20, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * 4 / seconds / 1e9


def make_cache(b, hkv, d, context, args, dtype, device) -> tuple[CompressedKV, torch.Tensor, torch.Tensor]:
    """A random STA cache of ``context`` slots and the dense keys / values of the same shape."""
    s, w = min(args.sinks, context), min(args.window, max(context - args.sinks, 0))
    c = context - s - w
    n = args.atoms
    index_dtype = torch.int16 if n <= 2**15 else torch.int32

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    def codes(k):
        indices = torch.randint(0, n, (b, hkv, c, k), device=device, dtype=index_dtype)
        return indices, randn(b, hkv, c, k, scale=k**-0.5)

    (ki, kc), (vi, vc) = codes(args.k_key), codes(args.k_value)
    kv = CompressedKV(
        sink_keys=randn(b, hkv, s, d),
        sink_values=randn(b, hkv, s, d),
        key_indices=ki,
        key_coefficients=kc,
        value_indices=vi,
        value_coefficients=vc,
        window_keys=randn(b, hkv, w, d),
        window_values=randn(b, hkv, w, d),
        key_atoms=randn(1, n, d, scale=d**-0.5),
        key_bias=randn(1, d, scale=0.1),
        value_atoms=randn(1, n, d, scale=d**-0.5),
        value_bias=randn(1, d, scale=0.1),
    )
    return kv, randn(b, hkv, context, d), randn(b, hkv, context, d)


def sta_bytes(kv: CompressedKV) -> int:
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    parts = (
        kv.sink_keys,
        kv.sink_values,
        kv.window_keys,
        kv.window_values,
        kv.key_indices,
        kv.key_coefficients,
        kv.value_indices,
        kv.value_coefficients,
        kv.key_atoms,
        kv.value_atoms,
    )
    return sum(size(t) for t in parts)


def methods(query, kv, keys, values, args, device):
    """``(name, kind, fn, bytes)`` for every path that runs on this device."""
    b, hq, _, d = query.shape
    scale = d**-0.5
    dense_bytes = keys.numel() * keys.element_size() * 2
    yield (
        "dense sdpa",
        "attention",
        lambda: F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True),
        dense_bytes,
    )
    if device.type == "cuda":
        try:
            from flash_attn import flash_attn_with_kvcache
        except ImportError:
            pass
        else:
            q, k, v = query.transpose(1, 2), keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()
            yield (
                "dense flash-attn",
                "attention",
                lambda: flash_attn_with_kvcache(q, k, v, softmax_scale=scale),
                dense_bytes,
            )
    nbytes = sta_bytes(kv)
    yield "sta reference", "attention", lambda: reference.sparse_attention_reference(query, kv, None, scale), nbytes
    rows = b * kv.window_keys.shape[1]
    x = torch.randn(rows, d, device=query.device, dtype=query.dtype)
    n = kv.key_atoms.shape[1]
    W_enc = (torch.randn(d, n, device=query.device) * d**-0.5).to(query.dtype)
    b_enc, b_dec = torch.zeros(n, device=query.device, dtype=query.dtype), kv.key_bias[0]
    atoms = F.normalize(kv.key_atoms[0].float(), dim=-1).to(query.dtype)
    enc_bytes = W_enc.numel() * W_enc.element_size() + x.numel() * x.element_size()
    omp_bytes = atoms.numel() * atoms.element_size() + x.numel() * x.element_size()
    encoders = [
        (
            "topk encode reference",
            lambda: reference.topk_encode_reference(x, W_enc, b_enc, b_dec, args.k_value),
            enc_bytes,
        ),
        ("omp encode reference", lambda: reference.omp_encode_reference(x, atoms, b_dec, args.k_value), omp_bytes),
    ]
    if device.type == "cuda":
        from sta_cache.kernels import triton_attention, triton_encode

        yield "sta triton", "attention", lambda: triton_attention.sparse_attention(query, kv, None, scale, None), nbytes
        encoders += [
            ("topk encode triton", lambda: triton_encode.topk_encode(x, W_enc, b_enc, b_dec, args.k_value), enc_bytes),
            ("omp encode triton", lambda: triton_encode.omp_encode(x, atoms, b_dec, args.k_value), omp_bytes),
        ]
    for name, fn, nb in encoders:
        yield name, "encode", fn, nb


def markdown(rows: list[dict], meta: dict) -> str:
    head = (
        f"device: {meta['device']} | dtype {meta['dtype']} | Hq/Hkv {meta['q_heads']}/{meta['kv_heads']} | "
        f"N {meta['atoms']} | k key/value {meta['k_key']}/{meta['k_value']} | sinks {meta['sinks']} | window "
        f"{meta['window']} | peak {meta['peak_gbps']:.0f} GB/s\n\n"
    )
    cols = "| method | B | ctx | d | median ms | MB | GB/s | floor ms | x floor | vs dense | % of step |"
    lines = [cols, "|" + "---|" * (cols.count("|") - 1)]
    for r in rows:
        pct = f"{100 * r['fraction_of_step']:.1f}" if r.get("fraction_of_step") is not None else ""
        vs = f"{r['speedup_vs_dense']:.2f}x" if r.get("speedup_vs_dense") is not None else ""
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['context']} | {r['head_dim']} | {1e3 * r['seconds']:.3f} | "
            f"{r['bytes'] / 1e6:.1f} | {r['gbps']:.1f} | {1e3 * r['floor_seconds']:.4f} | "
            f"{r['seconds'] / r['floor_seconds']:.1f} | {vs} | {pct} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.5), squeeze=False)
    for ax, d in zip(axes[0], dims, strict=True):
        series = sorted({(r["method"], r["batch"]) for r in rows if r["head_dim"] == d and r["kind"] == "attention"})
        for method, b in series:
            pts = sorted(
                (r["context"], r["seconds"]) for r in rows if (r["method"], r["batch"], r["head_dim"]) == (method, b, d)
            )
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{method}, B={b}")
        floors = sorted(
            {
                (r["context"], r["batch"], r["floor_seconds"])
                for r in rows
                if r["head_dim"] == d and r["method"].startswith("sta reference")
            }
        )
        for b in sorted({f[1] for f in floors}):
            pts = [(c, s) for c, bb, s in floors if bb == b]
            ax.plot(*zip(*pts, strict=True), linestyle=":", color="gray", label=f"STA byte floor, B={b}")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="context (tokens)",
            ylabel="median seconds per layer step",
            title=f"decode step, d={d}",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    peak = args.peak_gbps or copy_bandwidth_gbps(device, args.reps)
    torch.manual_seed(0)
    rows = []
    for d in args.head_dim:
        for b in args.batch:
            for context in args.contexts:
                kv, keys, values = make_cache(b, args.kv_heads, d, context, args, dtype, device)
                query = torch.randn(b, args.q_heads, 1, d, device=device).to(dtype)
                block = []
                for name, kind, fn, nbytes in methods(query, kv, keys, values, args, device):
                    seconds = median_seconds(fn, device, args.reps)
                    block.append(
                        dict(
                            method=name,
                            kind=kind,
                            batch=b,
                            context=context,
                            head_dim=d,
                            seconds=seconds,
                            bytes=nbytes,
                            gbps=nbytes / seconds / 1e9,
                            floor_seconds=nbytes / (peak * 1e9),
                        )
                    )
                dense = min(r["seconds"] for r in block if r["method"].startswith("dense"))
                step = min(r["seconds"] for r in block if r["method"].startswith("sta"))
                for r in block:
                    if r["kind"] == "attention":
                        r["speedup_vs_dense"] = dense / r["seconds"]
                    else:  # one key and one value encode per layer step, against that step's attention
                        r["fraction_of_step"] = 2 * r["seconds"] / step
                rows += block
                print(
                    f"d={d} B={b} ctx={context}: "
                    + ", ".join(f"{r['method']} {1e3 * r['seconds']:.3f} ms" for r in block),
                    flush=True,
                )
    meta = dict(
        vars(args),
        out=str(args.out),
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        peak_gbps=peak,
        torch=torch.__version__,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    table = markdown(rows, meta)
    (args.out / "results.md").write_text(table)
    plot(rows, args.out / "results.png")
    print(table)


if __name__ == "__main__":
    main()
