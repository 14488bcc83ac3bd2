"""End-to-end decode benchmark on the CPU: bytes per token, compression and decode-step latency against context.

For each context length the caches are filled directly with states of the right shapes (random values; attention
cost does not depend on them) instead of running a long prefill, then the median latency of one decode step of
the whole model is timed — for SparseSemanticCache that step includes encoding the token that leaves the window.
Bytes are the real stored tensors after the fill. Writes JSON + a PNG plot to --out and prints a markdown table.

    python benchmarks/bench_decode_cpu.py --contexts 1024,4096,16384 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, QuantizedCache

from sta_cache import KVDictionary, SparseSemanticCache
from sta_cache.benchmark_quality import cache_bytes
from sta_cache.embedded import load_model

from bench_memory import fill_sparse  # noqa: E402 (a sibling script)


def fill_dense(cache, config, length: int) -> None:
    heads, d = config.num_key_value_heads, config.head_dim
    for layer_idx in range(config.num_hidden_layers):
        states = torch.randn(1, heads, length, d)
        cache.update(states, states.clone(), layer_idx)


def fill_codes(cache, config, length: int) -> None:
    fill_sparse(cache, config.num_key_value_heads, config.head_dim, length)


@torch.no_grad()
def decode_latency(model, cache, steps: int) -> float:
    token = torch.tensor([[42]])
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model(token, past_key_values=cache)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dictionary", default="sta-cache/SmolLM2-135M-Instruct")
    parser.add_argument("--contexts", default="1024,4096,16384")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    config = model.config.get_text_config()
    dictionary = KVDictionary.from_pretrained(args.dictionary)

    def sparse(**options):
        return lambda: SparseSemanticCache(dictionary, config=model.config, **options)

    setups = {
        "DynamicCache (sdpa)": ("sdpa", lambda: DynamicCache(config=model.config), fill_dense),
        "QuantizedCache quanto int4 (sdpa)": (
            "sdpa", lambda: QuantizedCache(backend="quanto", config=model.config, nbits=4, residual_length=64), fill_dense
        ),
        "STA 8/16 (sta)": ("sta", sparse(), fill_codes),
        "STA 8/16 (sdpa, dense path)": ("sdpa", sparse(), fill_codes),
        "STA 8/16 fp8+packed (sta)": ("sta", sparse(coefficient_dtype=torch.float8_e4m3fn, pack_indices=True), fill_codes),
    }
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        for name, (attention, make, fill) in setups.items():
            model.set_attn_implementation(attention)
            cache = make()
            fill(cache, config, context)
            stored = cache_bytes(cache)["total"]
            latency = decode_latency(model, cache, args.steps)
            rows.append({"cache": name, "context": context, "ms": latency, "bytes_per_token": stored / context})
            print(f"{name:36s} ctx {context:6d}  {latency:8.1f} ms  {stored / context:9.0f} B/token", flush=True)
    dense = {row["context"]: row for row in rows if row["cache"].startswith("DynamicCache")}
    for row in rows:
        row["vs_dynamic"] = row["ms"] / dense[row["context"]]["ms"]
        row["compression"] = dense[row["context"]]["bytes_per_token"] / row["bytes_per_token"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    plot(rows, args.out / "decode_latency.png")
    print(f"\nSmolLM2-135M fp32, {args.threads} threads, median of {args.steps} decode steps, batch 1\n")
    print("| cache | context | step ms | x DynamicCache | bytes/token | x smaller |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['cache']} | {row['context']} | {row['ms']:.1f} | {row['vs_dynamic']:.2f} | "
              f"{row['bytes_per_token']:,.0f} | {row['compression']:.2f} |")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(row["cache"] for row in rows):
        points = [(row["context"], row["ms"]) for row in rows if row["cache"] == name]
        axis.plot(*zip(*points), marker="o", label=name)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("context (tokens)")
    axis.set_ylabel("decode step (ms)")
    axis.set_title("SmolLM2-135M decode step on the CPU")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
