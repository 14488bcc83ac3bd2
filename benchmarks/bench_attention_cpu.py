"""How far a compiled CPU kernel could take sparse attention: one layer, one decode query, SmolLM2 shapes.

An experiment, not a shipped path: the same gather formulation run eagerly and through ``torch.compile``
(inductor's C++ backend, needs a C++ compiler), against ``scaled_dot_product_attention`` over dense fp32 keys and
values. Post-RoPE rows do the whole attention (scores gathered from one q . D^T product, softmax, weights
scattered into atom space); pre-RoPE rows only the scores (keys rebuilt from their atoms, rotated, dotted).

    python benchmarks/bench_attention_compiled_cpu.py --contexts 4096,32768 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

KV_HEADS, GROUPS, HEAD_DIM, N_ATOMS, K_KEY, K_VALUE = 3, 3, 64, 1024, 8, 16


def post_rope_attention(q, key_atoms, key_idx, key_coef, value_atoms, value_idx, value_coef, scale: float):
    """``q [H, G, d]``, atoms ``[H, N, d]``, codes ``[H, T, k]`` -> output ``[H, G, d]``."""
    atom_scores = torch.einsum("hgd,hnd->hgn", q, key_atoms)
    gathered = torch.gather(atom_scores.unsqueeze(2).expand(-1, -1, key_idx.shape[1], -1), 3,
                            key_idx.long().unsqueeze(1).expand(-1, GROUPS, -1, -1))  # fmt: skip
    weights = torch.softmax((gathered * key_coef.float().unsqueeze(1)).sum(-1) * scale, -1)
    contributions = (weights.unsqueeze(-1) * value_coef.float().unsqueeze(1)).reshape(KV_HEADS, GROUPS, -1)
    index = value_idx.long().reshape(KV_HEADS, 1, -1).expand(-1, GROUPS, -1)
    atom_weights = torch.zeros(KV_HEADS, GROUPS, N_ATOMS).scatter_add_(-1, index, contributions)
    return torch.einsum("hgn,hnd->hgd", atom_weights, value_atoms)


def pre_rope_scores(q, key_atoms, key_idx, key_coef, cos, sin):
    """Scores ``[H, G, T]`` of keys rebuilt from codes and rotated by ``cos/sin [T, d/2]``."""
    rows = torch.gather(key_atoms.unsqueeze(1).expand(-1, key_idx.shape[1], -1, -1), 2,
                        key_idx.long().unsqueeze(-1).expand(-1, -1, -1, HEAD_DIM))  # fmt: skip
    keys = (rows * key_coef.float().unsqueeze(-1)).sum(2)
    first, second = keys.chunk(2, dim=-1)
    keys = torch.cat([first * cos - second * sin, second * cos + first * sin], -1)
    return torch.einsum("hgd,htd->hgt", q, keys)


def milliseconds(fn, *args, reps: int = 10) -> float:
    for _ in range(2):
        fn(*args)
    start = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - start) / reps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="4096,32768")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compiled_post, compiled_pre = torch.compile(post_rope_attention, dynamic=True), torch.compile(pre_rope_scores,
                                                                                                 dynamic=True)  # fmt: skip
    print("| context | sdpa dense (whole attention) | post-RoPE eager | post-RoPE compiled | pre-RoPE scores eager "
          "| pre-RoPE scores compiled |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for context in [int(c) for c in args.contexts.split(",")]:
        q = torch.randn(KV_HEADS, GROUPS, HEAD_DIM)
        key_atoms, value_atoms = torch.randn(KV_HEADS, N_ATOMS, HEAD_DIM), torch.randn(KV_HEADS, N_ATOMS, HEAD_DIM)
        key_idx = torch.randint(0, N_ATOMS, (KV_HEADS, context, K_KEY), dtype=torch.int16)
        value_idx = torch.randint(0, N_ATOMS, (KV_HEADS, context, K_VALUE), dtype=torch.int16)
        key_coef, value_coef = torch.randn(KV_HEADS, context, K_KEY), torch.randn(KV_HEADS, context, K_VALUE)
        angles = torch.arange(context).float()[:, None] * torch.rand(HEAD_DIM // 2)
        post = (q, key_atoms, key_idx, key_coef, value_atoms, value_idx, value_coef, HEAD_DIM**-0.5)
        pre = (q, key_atoms, key_idx, key_coef, angles.cos(), angles.sin())
        for eager, compiled, inputs in ((post_rope_attention, compiled_post, post), (pre_rope_scores, compiled_pre, pre)):
            expected, got = eager(*inputs), compiled(*inputs)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # the compiled kernel computes the same
        keys, values = torch.randn(1, KV_HEADS, context, HEAD_DIM), torch.randn(1, KV_HEADS, context, HEAD_DIM)
        query = torch.randn(1, KV_HEADS * GROUPS, 1, HEAD_DIM)
        times = [
            milliseconds(lambda: F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)),
            milliseconds(post_rope_attention, *post),
            milliseconds(compiled_post, *post),
            milliseconds(pre_rope_scores, *pre),
            milliseconds(compiled_pre, *pre),
        ]
        print(f"| {context} | " + " | ".join(f"{t:.2f}" for t in times) + " |", flush=True)


if __name__ == "__main__":
    main()
