"""A character tokenizer, a tiny Llama and word-salad text files: what the training tests learn dictionaries from
(also imported by the torchrun job script ``distributed_train.py``)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 97
WORDS = "the of and a to in is was for on that with as by at from his her it an were are which this be".split()


class CharTokenizer:
    """One id per character, BOS=1 in front when special tokens are asked for (like Llama's tokenizer)."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, verbose=False):
        ids = [3 + ord(c) % (VOCAB - 3) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """2 layers, 4 query heads, 2 KV heads of head_dim 16; the same weights for the same seed in every process."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
    )
    return LlamaForCausalLM(config).eval()


def write_words(path: Path, lines: int = 1500, seed: int = 0) -> Path:
    """``lines`` random sentences of 6-14 common words, one per line."""
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(lines)]
    path.write_text("\n".join(sentences) + "\n")
    return path
