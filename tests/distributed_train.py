"""A training job for tests/test_distributed.py, run as a plain process or under ``torchrun``: a tiny random-init
Llama (the same weights in every process) learns dictionaries from a text file.

    python tests/distributed_train.py OUT TEXT [--method mod|sae] [--shard data|layers]
"""

from __future__ import annotations

import argparse

import torch
from char_text import CharTokenizer, tiny_llama

from sta_cache.training import TrainConfig, train_dictionary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("text")
    parser.add_argument("--method", default="mod")
    parser.add_argument("--shard", default="data")
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TrainConfig(
        method=args.method,
        shard=args.shard,
        n_atoms=48,
        k_key=4,
        k_value=6,
        context=64,
        max_tokens=20 * 64,
        eval_tokens=512,
        vectors=1500,
        iterations=args.iterations,
        epochs=1.0,
        batch_size=128,
        buffer_size=1024,
        check_perplexity=False,
    )
    train_dictionary(tiny_llama(), CharTokenizer(), args.text, config, args.out, progress=False)


if __name__ == "__main__":
    main()
