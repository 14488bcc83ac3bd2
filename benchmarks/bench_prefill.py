"""Time to first token on the CPU: the prefill of a held-out prompt (one forward with the last position's logits
only, as ``generate`` computes it; the prompt's coding included for SparseSemanticCache) for DynamicCache and for
SparseSemanticCache with float32 and with bfloat16 correlations in the Gram encoder, and with values rotated at 3 bits
(``value_bits=3``: the pursuit codes keys only), alternating them ``--reps`` times so that the machine's drift hits
each alike. Seconds are medians; each ratio is the median of the rounds' ratios to DynamicCache.

    python benchmarks/bench_prefill.py --prompts 1024,4096 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from sta_cache import KVDictionary, SparseSemanticCache
from sta_cache.collect import token_windows
from sta_cache.compat import cache_kwargs
from sta_cache.embedded import load_model, wikipedia_text
from sta_cache.kernels import cpu_kernels

SETUPS = (
    "DynamicCache (sdpa)",
    "STA 8/16, float32 correlations",
    "STA 8/16, bfloat16 correlations",
    "STA 8/r3, bfloat16 correlations",  # values rotated at 3 bits: only the keys go through the pursuit
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dictionary", default="sta-cache/SmolLM2-135M-Instruct", help="the SmolLM2 dictionary (folder or Hub id)"
    )
    parser.add_argument("--prompts", default="1024,4096", help="prompt lengths in tokens")
    parser.add_argument("--reps", type=int, default=3, help="rounds of every setup in turn; the table gives medians")
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenMP threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2")
    dictionary = KVDictionary.from_pretrained(args.dictionary)
    default = cpu_kernels.bf16_correlations
    print("| prompt | " + " | ".join(SETUPS) + " |\n| ---: |" + " ---: |" * len(SETUPS))
    for length in [int(n) for n in args.prompts.split(",")]:
        prompt = token_windows(tokenizer, wikipedia_text("eval"), length, 1)
        seconds = {name: [] for name in SETUPS}
        for _ in range(args.reps):
            for name in SETUPS:
                if name.startswith("DynamicCache"):
                    model.set_attn_implementation("sdpa")
                    cache = DynamicCache(config=model.config)
                else:
                    model.set_attn_implementation("sta")
                    values = {"value_bits": 3} if "/r3" in name else {}
                    cache = SparseSemanticCache(dictionary, config=model.config, **values)
                    bf16 = "bfloat16" in name
                    cpu_kernels.bf16_correlations = lambda bf16=bf16: bf16  # what omp_encode asks by default
                with torch.no_grad():
                    start = time.perf_counter()
                    model(prompt, logits_to_keep=1, **cache_kwargs(model, cache))  # as generate: last logits only
                    seconds[name].append(time.perf_counter() - start)
        cpu_kernels.bf16_correlations = default
        # each ratio is the median of the rounds' ratios to DynamicCache in the same round: one round moves by
        # +-0.15 here, and pairing removes the drift that hits a whole round
        dense = seconds[SETUPS[0]]
        cells = [
            f"{statistics.median(v):.2f} (×{statistics.median(t / d for t, d in zip(v, dense, strict=True)):.2f})"
            for v in seconds.values()
        ]
        print(f"| {length:,} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
