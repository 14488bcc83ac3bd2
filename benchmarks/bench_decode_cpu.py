"""End-to-end decode benchmark on the CPU: bytes per token, compression, perplexity ratio and decode-step latency
against context length, for DynamicCache, quanto int4 and SparseSemanticCache.

For each context length the caches are filled directly with states of the right shapes (random values; attention
cost does not depend on them) instead of running a long prefill. Then ``--steps`` decode steps of the whole model
are timed (after one warm-up step). SparseSemanticCache encodes the tokens that leave its window ``encode_batch``
(16) at a time, so one step in 16 also runs the encoder: the table gives the median step (no encoding), the mean
step over 16 steps (encoding amortised: what generation really pays per token) and the encoder's cost per token
over all layers, at 16 tokens per call (decode) and at 1,024 (a prompt, coded layer by layer during the prefill).

``--generate 1024,4096,16384`` times ``model.generate`` end to end from held-out prompts of those lengths, greedy
to the largest of ``--new-tokens`` (64,512): time to the first token and to each of ``--new-tokens``, against
DynamicCache's on the same prompt. Both tables run ``--reps`` rounds that each run every cache in turn (medians;
each ratio is the median of the rounds' ratios, so drift of the machine between rounds cancels); ``--setups``
narrows the step table to some caches. ``--generate-only`` skips the step table.

Rows marked ``torch`` attend and encode through the PyTorch path, ``cpu`` through the C kernels
(kernels/cpu_kernels.c). Post-RoPE rows use ``--post-rope-dictionary`` (scores gathered from one
``q . D^T`` product instead of rebuilding and rotating keys), by default the shipped dictionary with its
``key_space`` switched, which times the same shapes but is not a usable dictionary. ``--quality results.json``
(from ``sta-cache eval``, one or more) adds the perplexity ratio of the matching pre-RoPE rows,
``--post-rope-quality`` that of the post-RoPE rows.

    python benchmarks/bench_decode_cpu.py --contexts 1024,4096,16384,32768 --threads 2 \
        --quality eval_fp32/results.json eval_fp8/results.json
    python benchmarks/bench_decode_cpu.py --generate 1024,4096 --new-tokens 64 --reps 3 --generate-only
    python benchmarks/bench_decode_cpu.py --contexts 1024,4096 --reps 5 --setups "8/r3" "8/16 pre-RoPE (sta, cpu)"
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from bench_memory import TokenClock, fill_sparse, versions  # a sibling script
from transformers import DynamicCache, QuantizedCache

from sta_cache import KVDictionary, SparseSemanticCache
from sta_cache.collect import token_windows
from sta_cache.compat import cache_kwargs
from sta_cache.embedded import load_model, wikipedia_text
from sta_cache.evaluation.bytes import cache_bytes


def fill_dense(cache, config, length: int) -> None:
    heads, d = config.num_key_value_heads, config.head_dim
    for layer_idx in range(config.num_hidden_layers):
        states = torch.randn(1, heads, length, d)
        cache.update(states, states.clone(), layer_idx)


def fill_codes(cache, config, length: int) -> None:
    fill_sparse(cache, config.num_key_value_heads, config.head_dim, length)


@torch.no_grad()
def step_times(model, cache, steps: int) -> list[float]:
    """Milliseconds of each of ``steps`` single-token decode steps, after one warm-up step."""
    token = torch.tensor([[42]])
    model(token, **cache_kwargs(model, cache))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(token, **cache_kwargs(model, cache))
        times.append((time.perf_counter() - start) * 1000)
    return times


ROTATED = "STA 8/r3 pre-RoPE fp8+packed (sta, cpu)"
ENCODE_BATCH = 16  # tokens per call during decode: SparseSemanticCache's default encode_batch
PREFILL_TOKENS = 1024  # tokens per call when a prompt is encoded layer by layer


@torch.no_grad()
def encode_ms_per_token(cache, config, tokens: int) -> float:
    """Encoder time per token over all layers: code ``tokens`` new window overflow tokens of every layer."""
    heads, d = config.num_key_value_heads, config.head_dim
    for layer in cache.sparse_layers:
        extra = torch.randn(1, heads, tokens, d)
        layer.keys, layer.values = torch.cat([layer.keys, extra], 2), torch.cat([layer.values, extra.clone()], 2)
        last = int(layer.window_positions[0, -1])
        more = torch.arange(last + 1, last + 1 + tokens).unsqueeze(0)
        layer.window_positions = torch.cat([layer.window_positions, more], 1)
        layer.window_real = torch.cat([layer.window_real, torch.ones(1, tokens, dtype=torch.bool)], 1)
    start = time.perf_counter()
    cache.flush()
    return (time.perf_counter() - start) * 1000 / tokens


@torch.no_grad()
def generate_timing(model, prompt: torch.Tensor, make, new_tokens: list[int]) -> list[dict]:
    """Greedy ``model.generate`` from ``prompt [1, L]`` for ``max(new_tokens)`` tokens (exactly: EOS does not stop
    it), once, after a short warm-up generate (loading kernels, first-call allocations), with the arrival time of
    every token: time to first token (the prefill, which for
    SparseSemanticCache includes encoding the prompt layer by layer), and for each count in ``new_tokens`` the
    time to that token and the tokens per second up to it."""
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    warm = {"input_ids": prompt[:, :128], "attention_mask": torch.ones_like(prompt[:, :128])}
    model.generate(**warm, **cache_kwargs(model, make()), max_new_tokens=2, do_sample=False)  # one-time set-up
    cache, clock = make(), TokenClock()
    count = max(new_tokens)
    model.generate(
        **inputs,
        **cache_kwargs(model, cache),
        max_new_tokens=count,
        min_new_tokens=count,
        do_sample=False,
        streamer=clock,
    )
    first = clock.arrivals[0]
    rows = []
    for n in new_tokens:
        total = clock.arrivals[n - 1]
        rows.append(
            {
                "new_tokens": n,
                "first_token_s": first,
                "total_s": total,
                "tokens_per_s": n / total,
                "decode_tokens_per_s": (n - 1) / (total - first),
            }
        )
    return rows


def generate_rows(rounds: list[dict[str, list[dict]]], length: int) -> list[dict]:
    """One row per cache and count of new tokens: the median over rounds of each timing, and of each ratio to
    DynamicCache's timing in the same round (a round runs every cache in turn, so drift of the machine between
    rounds cancels in the ratios); every round's values are kept beside the medians."""
    rows = []
    for name in rounds[0]:
        for i, n in enumerate(rounds[0][name]):
            runs = [r[name][i] for r in rounds]
            dynamic = [r["DynamicCache (sdpa)"][i] for r in rounds]
            row = {"cache": name, "prompt_tokens": length, "new_tokens": n["new_tokens"], "rounds": len(runs)}
            for key in ("first_token_s", "total_s", "tokens_per_s", "decode_tokens_per_s"):
                row[key] = statistics.median(run[key] for run in runs)
            for key, ratio in (("first_token_s", "first_token_vs_dynamic"), ("total_s", "total_vs_dynamic")):
                each = [run[key] / base[key] for run, base in zip(runs, dynamic, strict=True)]
                row[ratio], row[f"{ratio}_each_round"] = statistics.median(each), each
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="an embedded model (smollm2, gemma3), a folder or a Hub id")
    parser.add_argument(
        "--dictionary", default="sta-cache/SmolLM2-135M-Instruct", help="the pre-RoPE dictionary (folder or Hub id)"
    )
    parser.add_argument(
        "--contexts", default="1024,4096,16384", help="step table: cache lengths in tokens, comma-separated"
    )
    parser.add_argument("--steps", type=int, default=16, help="timed steps (16 = one encoder batch)")
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenMP threads")
    parser.add_argument("--post-rope-dictionary", default=None, help="a post-RoPE dictionary (folder or Hub id)")
    parser.add_argument("--quality", type=Path, nargs="*", default=[], help="results.json files of `sta-cache eval`")
    parser.add_argument("--post-rope-quality", type=Path, nargs="*", default=[], help="the same, post-RoPE dictionary")
    parser.add_argument("--generate", default="", help="prompt lengths for end-to-end generate timing, e.g. 1024,4096")
    parser.add_argument(
        "--new-tokens",
        default="64,512",
        help="for --generate: report the time to each of these tokens (one run to the largest)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=1,
        help="rounds of every cache in turn, for the step table and --generate alike; the tables give medians, each "
        "ratio the median of the rounds' ratios to DynamicCache",
    )
    parser.add_argument(
        "--setups",
        nargs="*",
        default=[],
        help="step table only: the setups whose names contain one of these strings, e.g. '8/r3' '8/16 pre-RoPE "
        "(sta, cpu)' (DynamicCache always runs; default: all)",
    )
    parser.add_argument("--generate-only", action="store_true", help="skip the decode-step table")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/decode_cpu"),
        help="folder for results.json and the step table's decode_latency.png",
    )
    args = parser.parse_args()
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    config = model.config.get_text_config()
    dictionary = KVDictionary.from_pretrained(args.dictionary)
    if args.post_rope_dictionary:
        post_rope = KVDictionary.from_pretrained(args.post_rope_dictionary)
        if post_rope.config.key_space != "post_rope":
            raise ValueError(f"{args.post_rope_dictionary} codes keys {post_rope.config.key_space}, not post-RoPE")
    else:
        post_rope = copy.copy(dictionary)
        post_rope.config = dataclasses.replace(dictionary.config, key_space="post_rope")

    def sparse(source=dictionary, **options):
        return lambda: SparseSemanticCache(source, config=model.config, **options)

    fp8_packed = dict(coefficient_dtype=torch.float8_e4m3fn, pack_indices=True)
    # name: (attention, make, fill, name of the matching `sta-cache eval` row)
    setups = {
        "DynamicCache (sdpa)": ("sdpa", lambda: DynamicCache(config=model.config), fill_dense, None),
        "QuantizedCache quanto int4 (sdpa)": (
            "sdpa",
            lambda: QuantizedCache(backend="quanto", config=model.config, nbits=4, residual_length=64),
            fill_dense,
            ("pre-RoPE", "QuantizedCache quanto int4"),
        ),
        "STA 8/16 pre-RoPE (sdpa, dense path)": ("sdpa", sparse(), fill_codes, ("pre-RoPE", "STA 8/16, fp32 (sta)")),
    }
    for space, source in (("pre-RoPE", dictionary), ("post-RoPE", post_rope)):
        for storage, options, quality_name in (
            ("", {}, "STA 8/16, fp32 (sta)"),
            (" fp8+packed", fp8_packed, "STA 8/16, fp8 (sta)"),
        ):
            for backend in ("torch", "cpu"):
                setups[f"STA 8/16 {space}{storage} (sta, {backend})"] = (
                    "sta",
                    sparse(source, backend=backend, **options),
                    fill_codes,
                    (space, quality_name),
                )

    # keys as 8 atoms, values rotated at 3 bits per coordinate (value_bits=3): the encoder codes keys only
    setups[ROTATED] = (
        "sta",
        sparse(backend="cpu", value_bits=3, **fp8_packed),
        fill_codes,
        ("pre-RoPE", "STA 8/r3, fp8 (sta)"),
    )

    def ratios(paths):
        return {row["name"]: row.get("ppl_ratio") for path in paths for row in json.loads(path.read_text())["rows"]}

    quality = {"pre-RoPE": ratios(args.quality), "post-RoPE": ratios(args.post_rope_quality)}
    rows, generated = [], []

    def write() -> None:  # after every generate run too: a long run that is stopped keeps what it measured
        args.out.mkdir(parents=True, exist_ok=True)
        results = {"threads": args.threads, "versions": versions(), "rows": rows, "generate": generated}
        (args.out / "results.json").write_text(json.dumps(results, indent=2))

    step_setups = [name for name in setups if name.startswith("DynamicCache") or _chosen(name, args.setups)]
    for context in [] if args.generate_only else [int(c) for c in args.contexts.split(",")]:
        rounds = []  # rounds[r][name]: that cache's step times in round r
        for round_index in range(args.reps):
            rounds.append({})
            for name in step_setups:
                attention, make, fill, quality_name = setups[name]
                model.set_attn_implementation(attention)
                cache = make()
                fill(cache, config, context)
                times = step_times(model, cache, args.steps)
                rounds[-1][name] = times
                print(
                    f"{name:38s} ctx {context:6d}  round {round_index + 1}  median {statistics.median(times):7.1f} ms  "
                    f"mean {statistics.fmean(times):7.1f} ms",
                    flush=True,
                )
                if round_index == 0:
                    rows.append(
                        {
                            "cache": name,
                            "context": context,
                            "bytes_per_token": cache_bytes(cache)["total"] / context,
                            "perplexity_ratio": quality[quality_name[0]].get(quality_name[1]) if quality_name else None,
                        }
                    )
                    if isinstance(cache, SparseSemanticCache):
                        rows[-1]["encode_ms_per_token"] = encode_ms_per_token(cache, config, ENCODE_BATCH)
                        rows[-1]["prefill_encode_ms_per_token"] = encode_ms_per_token(cache, config, PREFILL_TOKENS)
        step_rows(rows, rounds, context)
    generate_setups = [
        "DynamicCache (sdpa)",
        "QuantizedCache quanto int4 (sdpa)",
        "STA 8/16 pre-RoPE (sta, cpu)",
        "STA 8/16 pre-RoPE fp8+packed (sta, cpu)",
        ROTATED,
    ]
    new_tokens = sorted(int(n) for n in args.new_tokens.split(","))
    for length in [int(c) for c in args.generate.split(",") if c]:
        prompt = token_windows(tokenizer, wikipedia_text("eval"), length, 1)
        rounds = []  # rounds[r][name]: that cache's timings in round r, one per count of new_tokens
        for _ in range(args.reps):
            rounds.append({})
            for name in generate_setups:
                attention, make, _, _ = setups[name]
                model.set_attn_implementation(attention)
                rounds[-1][name] = generate_timing(model, prompt, make, new_tokens)
                for timing in rounds[-1][name]:
                    print(
                        f"{name:38s} prompt {length:6d}  first token {timing['first_token_s']:6.2f} s  "
                        f"{timing['new_tokens']:4d} tokens {timing['total_s']:7.2f} s  "
                        f"{timing['tokens_per_s']:5.1f} tokens/s",
                        flush=True,
                    )
        generated += generate_rows(rounds, length)
        write()
    write()
    if rows:
        plot(rows, args.out / "decode_latency.png")
        print_step_table(rows, args)
    if generated:
        print_generate_table(generated)


def _chosen(name: str, wanted: list[str]) -> bool:
    """Whether setup ``name`` is asked for by ``--setups`` (parts of names; none: all)."""
    return not wanted or any(part in name for part in wanted)


def step_rows(rows: list[dict], rounds: list[dict[str, list[float]]], context: int) -> None:
    """Complete ``context``'s rows from the rounds' step times: medians over the rounds, and the ratio to
    DynamicCache as the median of each round's ratio of mean steps (drift between rounds cancels)."""
    dense = next(name for name in rounds[0] if name.startswith("DynamicCache"))
    dense_row = next(row for row in rows if row["context"] == context and row["cache"] == dense)
    for row in rows:
        if row["context"] != context:
            continue
        name = row["cache"]
        each = [statistics.fmean(r[name]) / statistics.fmean(r[dense]) for r in rounds]
        row.update(
            rounds=len(rounds),
            median_ms=statistics.median(statistics.median(r[name]) for r in rounds),
            mean_ms=statistics.median(statistics.fmean(r[name]) for r in rounds),
            mean_vs_dynamic=statistics.median(each),
            mean_vs_dynamic_each_round=each,
        )
        row["compression"] = dense_row["bytes_per_token"] / row["bytes_per_token"]


def print_step_table(rows: list[dict], args) -> None:
    print(
        f"\n{args.model} fp32, {args.threads} threads, batch 1, {args.steps} decode steps per row; window 64 + 4 "
        "sinks; mean = encoder amortised\n"
    )
    print(
        "| cache | context | median step ms | mean step ms | mean x DynamicCache | tokens/s | encode ms/token "
        f"({ENCODE_BATCH} / {PREFILL_TOKENS} per call) | bytes/token | x smaller | ppl ratio |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        encode = (
            f"{row['encode_ms_per_token']:.2f} / {row['prefill_encode_ms_per_token']:.2f}"
            if "encode_ms_per_token" in row
            else "—"
        )
        ratio = f"{row['perplexity_ratio']:.4f}" if row["perplexity_ratio"] else "—"
        print(
            f"| {row['cache']} | {row['context']} | {row['median_ms']:.1f} | {row['mean_ms']:.1f} | "
            f"{row['mean_vs_dynamic']:.2f} | {1000 / row['mean_ms']:.1f} | {encode} | "
            f"{row['bytes_per_token']:,.0f} | {row['compression']:.2f} | {ratio} |"
        )


def print_generate_table(generated: list[dict]) -> None:
    print(
        "\nmodel.generate, greedy, from a held-out Wikipedia prompt; per (cache, prompt) the median of "
        f"{generated[0]['rounds']} run(s) to the most tokens, ratios paired within a round\n"
    )
    print(
        "| cache | prompt tokens | new tokens | first token s | x DynamicCache | total s | x DynamicCache | tokens/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in generated:
        print(
            f"| {row['cache']} | {row['prompt_tokens']} | {row['new_tokens']} | {row['first_token_s']:.2f} | "
            f"{row['first_token_vs_dynamic']:.2f} | {row['total_s']:.2f} | {row['total_vs_dynamic']:.2f} | "
            f"{row['tokens_per_s']:.1f} |"
        )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.8))
    colours = itertools.cycle(plt.get_cmap("tab20").colors)  # 11 setups besides DynamicCache: more than tab10
    for name in dict.fromkeys(row["cache"] for row in rows):
        points = [(row["context"], row["mean_ms"]) for row in rows if row["cache"] == name]
        # the baseline in black; the PyTorch path and the dense path dashed, the C kernels solid
        style = {"color": "black", "linewidth": 2.5} if name.startswith("DynamicCache") else {"color": next(colours)}
        dashed = "torch)" in name or "sdpa" in name
        axis.plot(*zip(*points, strict=True), marker="o", linestyle="--" if dashed else "-", label=name, **style)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("context (tokens)")
    axis.set_ylabel("decode step, encoder amortised (ms)")
    axis.set_title("SmolLM2-135M decode step on the CPU")
    axis.legend(fontsize=7)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
