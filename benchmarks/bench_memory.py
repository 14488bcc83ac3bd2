"""Memory of SparseSemanticCache against DynamicCache and quanto, from the real stored tensors.

Two modes:

``layout`` (default): fills every layer of a cache with a given model geometry to a context length (sinks + codes
+ window) and reads ``memory_footprint()``. No model runs, so head_dim 128 geometries (Llama-3-8B: 32 layers x 8
KV heads) are measured without the weights.

    python benchmarks/bench_memory.py --context 4096

``generate``: runs ``model.generate`` on the embedded SmolLM2 (fp32) from Wikipedia prompts (eval split), each
cache in a fresh subprocess, and reports per run

* held: the bytes of the distinct tensor storages reachable from the cache's layers after ``generate`` (each
  storage once; SparseSemanticCache's shared dictionaries excluded, listed apart), and what the cache reports;
* peak growth: the process's resident-set high-water mark during ``generate`` minus its resident set just before
  (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after a warm-up generate so one-off costs such as
  loading the C kernels are not counted); it includes the model's activations, which is what a user pays. The
  children run with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``): every tensor above that
  is its own mapping and goes back to the system when freed. With glibc's default (a threshold that rises to 32
  MiB after the first large free), freed tensors stay in the heap and the high-water mark depends on allocation
  order: the same 4k prefill measured 406 and 810 MiB in two runs, against 176 and 176 MiB with the fixed
  threshold;
* time to first token, and the whole ``generate`` time.

    python benchmarks/bench_memory.py --generate --prompts 4096,16384,32768 --chunks 0,512 --json OUT.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from sta_cache import KVDictionary, KVDictionaryConfig, SparseSemanticCache, cache_kwargs
from sta_cache.layer import index_dtype
from sta_cache.memory import storage_bytes
from sta_cache.packing import pack_indices, pack_levels

GEOMETRIES = {
    "SmolLM2-135M (d=64)": (30, 3, 64),
    "Llama-3-8B (d=128)": (32, 8, 128),
}
STORAGE = {
    "fp16 coefficients, int16 indices": {},
    "fp8 coefficients, int16 indices": {"coefficient_dtype": torch.float8_e4m3fn},
    "fp8 coefficients, packed 10-bit indices": {"coefficient_dtype": torch.float8_e4m3fn, "pack_indices": True},
}
MMAP_THRESHOLD = 64 * 1024  # bytes: see the module docstring
# The caches of the generate mode: (label, attention implementation)
CACHES = {
    "dynamic": ("DynamicCache", "sdpa"),
    "quanto-int4": ("QuantizedCache quanto int4 (group 64, residual 128)", "sdpa"),
    "sta": ("SparseSemanticCache 8/16, defaults", "sta"),
    "sta-fp8-packed": ("SparseSemanticCache 8/16, fp8 + packed indices", "sta"),
}


# ============================================================================================ layout mode
class TokenClock(BaseStreamer):
    """A streamer that notes when each generated token arrives, in seconds from its creation (``generate`` first
    hands it the prompt, which is not a token)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.arrivals: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.arrivals.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


def versions() -> dict:
    """What a timing depends on besides the code, recorded with the results."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
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
            if layer.rotated(kind):  # the rotated coder is cheap: code random values as the cache would
                layer.codes[kind] = layer._encode(kind, torch.randn(1, heads, compressed, d))
                continue
            k = layer.k[kind]
            indices = torch.randint(0, layer.n_atoms, (1, heads, compressed, k))
            stored = (
                pack_indices(indices, layer.n_atoms) if layer.pack_indices else indices.to(index_dtype(layer.n_atoms))
            )
            coefficients = torch.randn(1, heads, compressed, k) * k**-0.5
            if layer.coefficient_bits:
                coefficients = pack_levels(coefficients, layer.coefficient_bits)
            layer.codes[kind] = (stored, coefficients.to(layer.coefficient_dtype))
        if layer.key_positions is not None:
            layer.key_positions = torch.arange(sinks, sinks + compressed, dtype=torch.int32).unsqueeze(0)
        layer.keys = layer.values = states
        layer.window_positions = torch.arange(length - window, length).unsqueeze(0)
        layer.window_real = torch.ones(1, window, dtype=torch.bool)
        assert layer.get_seq_length() == length, layer_idx


def layout_report(args: argparse.Namespace) -> None:
    print(f"context {args.context}, k {args.k_key}/{args.k_value}, N {args.n_atoms}, window 64 + 4 sinks, batch 1\n")
    print(
        "| model geometry | storage | codes + dense bytes | fp16 DynamicCache bytes | x smaller | dictionaries "
        "| break-even tokens |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (layers, heads, d) in GEOMETRIES.items():
        meta = KVDictionaryConfig(
            base_model=name,
            num_layers=layers,
            layer_indices=list(range(layers)),
            num_kv_heads=heads,
            head_dim=d,
            n_atoms=args.n_atoms,
            k_key=args.k_key,
            k_value=args.k_value,
            encoder="omp",
        )
        dictionary = KVDictionary(meta)
        for label, options in STORAGE.items():
            cache = SparseSemanticCache(dictionary, backend="torch", **options)
            fill_sparse(cache, heads, d, args.context, dtype=torch.float16)
            memory = cache.memory_footprint()
            stored = memory["code_bytes"] + memory["dense_bytes"]
            print(
                f"| {name} | {label} | {stored:,} | {memory['dynamic_cache_bytes']:,} | "
                f"{memory['compression_ratio']:.2f} | {memory['dictionary_bytes'] / 2**20:.1f} MiB (fp32) | "
                f"{memory['break_even_tokens']} |"
            )


# ========================================================================================== generate mode
@dataclass
class Run:
    """One ``generate`` in a fresh process."""

    cache: str
    prompt: int
    chunk: int  # prefill_chunk_size, 0 = the whole prompt at once
    new_tokens: int


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_freed_memory() -> None:
    """Return freed heap pages to the system, so the resident set before ``generate`` is what is really in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def held_bytes(cache, dictionary_tensors: list[torch.Tensor]) -> int:
    """Bytes of every distinct storage reachable from the cache's layers' attributes, the shared dictionary
    tensors excluded (they are counted apart)."""
    seen: set = set()
    storage_bytes(dictionary_tensors, seen)  # marks them as seen
    total = 0
    for layer in cache.layers:
        for name, value in vars(layer).items():
            if name in ("dictionary", "sae", "rope_inv_freq"):
                continue
            total += storage_bytes(value, seen)
    return total


def make_cache(name: str, model, dictionary: KVDictionary):
    from transformers import DynamicCache, QuantizedCache

    if name == "dynamic":
        return DynamicCache(config=model.config)
    if name == "quanto-int4":
        return QuantizedCache(backend="quanto", config=model.config, nbits=4, q_group_size=64, residual_length=128)
    options = {"coefficient_dtype": torch.float8_e4m3fn, "pack_indices": True} if name == "sta-fp8-packed" else {}
    return SparseSemanticCache(dictionary, config=model.config, **options)


def run_one(run: Run) -> dict:
    """Measure one run in this process (the parent starts a fresh process per run)."""
    from sta_cache.demo import PACKAGED_DICTIONARIES
    from sta_cache.embedded import eval_texts, load_default_model
    from sta_cache.evaluation.bytes import cache_bytes

    label, attn = CACHES[run.cache]
    model, tokenizer = load_default_model("smollm2", attn_implementation=attn)
    dictionary = KVDictionary.from_pretrained(PACKAGED_DICTIONARIES["smollm2"])
    prompt = eval_texts(tokenizer, 1, run.prompt)[0].unsqueeze(0)
    options = {"do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    if run.chunk:
        options["prefill_chunk_size"] = run.chunk

    with torch.no_grad():  # warm-up: imports, kernel loading, allocator pools
        model.generate(
            prompt[:, :256],
            **cache_kwargs(model, make_cache(run.cache, model, dictionary)),
            max_new_tokens=2,
            **options,
        )
        cache = make_cache(run.cache, model, dictionary)
        _release_freed_memory()
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        clock = TokenClock()
        model.generate(prompt, **cache_kwargs(model, cache), max_new_tokens=run.new_tokens, streamer=clock, **options)
        seconds = time.perf_counter() - clock.start
    peak = _status_kib("VmHWM")
    dictionary_tensors = [
        t for layer in cache.layers for t in (getattr(layer, "sae", None), getattr(layer, "rope_inv_freq", None))
    ]
    held = held_bytes(cache, dictionary_tensors)
    reported = cache_bytes(cache)
    return {
        **asdict(run),
        "label": label,
        "tokens": cache.get_seq_length(),
        "held_bytes": held,
        "reported_bytes": reported["total"],
        "dictionary_bytes": reported["dictionary"],
        "peak_growth_bytes": (peak - before) * 1024,
        "rss_before_bytes": before * 1024,
        "ttft_seconds": clock.arrivals[0],
        "generate_seconds": seconds,
    }


def generate_report(args: argparse.Namespace) -> None:
    runs = [
        Run(cache, prompt, chunk, args.new_tokens)
        for prompt in args.prompts
        for chunk in args.chunks
        for cache in args.caches
    ]
    results = []
    for run in runs:
        command = [sys.executable, __file__, "--run-one", json.dumps(asdict(run))]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            print(f"{run}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if args.json:  # after every run: a long sweep that is stopped keeps what it measured
            Path(args.json).write_text(json.dumps({"versions": versions(), "runs": results}, indent=1) + "\n")
        r = results[-1]
        print(
            f"{run.cache:>15} prompt {run.prompt:>6} chunk {run.chunk:>4}: held {r['held_bytes'] / 2**20:8.1f} MiB, "
            f"peak +{r['peak_growth_bytes'] / 2**20:8.1f} MiB, TTFT {r['ttft_seconds']:6.1f} s",
            flush=True,
        )
    print(
        f"\nSmolLM2-135M fp32, {args.new_tokens} new tokens, batch 1, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__}\n"
    )
    print(render_generate_table(results))


def render_generate_table(results: list[dict]) -> str:
    """Markdown: one row per run, with held bytes and peak growth against DynamicCache of the same prompt."""
    dynamic = {(r["prompt"], r["chunk"]): r for r in results if r["cache"] == "dynamic"}
    lines = [
        "| prompt | prefill chunk | cache | held MiB | reported MiB | held vs DynamicCache | peak growth MiB | "
        "peak vs DynamicCache | TTFT s |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    mib = 2**20
    for r in results:
        base = dynamic.get((r["prompt"], r["chunk"]))
        held_ratio = f"1/{base['held_bytes'] / r['held_bytes']:.2f}" if base else "—"
        peak_ratio = f"×{r['peak_growth_bytes'] / base['peak_growth_bytes']:.2f}" if base else "—"
        lines.append(
            f"| {r['prompt']:,} | {r['chunk'] or '—'} | {r['label']} | {r['held_bytes'] / mib:.1f} | "
            f"{r['reported_bytes'] / mib:.1f} | {held_ratio} | {r['peak_growth_bytes'] / mib:,.0f} | {peak_ratio} | "
            f"{r['ttft_seconds']:.1f} |"
        )
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096, help="layout mode: tokens of context per layer")
    parser.add_argument("--n-atoms", type=int, default=1024, help="layout mode: atoms per dictionary")
    parser.add_argument("--k-key", type=int, default=8, help="layout mode: atoms per key")
    parser.add_argument("--k-value", type=int, default=16, help="layout mode: atoms per value")
    parser.add_argument("--generate", action="store_true", help="run model.generate in fresh processes instead")
    parser.add_argument(
        "--prompts",
        type=_ints,
        default=[4096, 16384, 32768],
        help="generate mode: prompt lengths in tokens, comma-separated",
    )
    parser.add_argument(
        "--chunks",
        type=_ints,
        default=[0, 512],
        help="generate mode: prefill_chunk_size values, comma-separated (0 = no chunking)",
    )
    parser.add_argument(
        "--caches",
        type=lambda s: s.split(","),
        default=list(CACHES),
        help=f"generate mode: caches to run, comma-separated, of {', '.join(CACHES)}",
    )
    parser.add_argument("--new-tokens", type=int, default=8, help="generate mode: tokens to generate")
    parser.add_argument("--json", help="generate mode: also write every run's numbers to this file")
    parser.add_argument(
        "--render",
        nargs="+",
        metavar="JSON",
        help="print the table of runs saved by earlier --generate --json sweeps, and exit",
    )
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        runs = [run for path in args.render for run in json.loads(Path(path).read_text())["runs"]]
        print(render_generate_table(runs))
    elif args.run_one:
        print(json.dumps(run_one(Run(**json.loads(args.run_one)))))
    elif args.generate:
        unknown = sorted(set(args.caches) - set(CACHES))
        if unknown:
            parser.error(f"unknown caches {unknown}; choose from {', '.join(CACHES)}")
        generate_report(args)
    else:
        layout_report(args)


if __name__ == "__main__":
    main()
