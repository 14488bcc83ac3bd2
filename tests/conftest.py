"""Tiny random-init models of every supported architecture, and dictionaries to test the cache with."""

from __future__ import annotations

import os

# The Triton kernels run on the CPU under the interpreter; it must be chosen before anything imports triton
# (transformers does, through the model imports below).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from sta_cache import KVDictionary, KVDictionaryConfig
from sta_cache.geometry import SLIDING_LAYER_TYPES

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
)


def _gemma3():
    config = Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 4, "num_key_value_heads": 1},
        head_dim=32,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=32,
    )
    return Gemma3ForCausalLM(config)


ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, head_dim=16)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, head_dim=16, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16)),
    "gemma3": _gemma3,
}


def tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch]().eval()
    model.set_attn_implementation(attn_implementation)
    return model


def model_geometry(config) -> tuple[int, int, list[int]]:
    """(KV heads, head_dim, indices of the layers a dictionary covers) of a model config."""
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return heads, head_dim, [i for i, t in enumerate(types) if t not in SLIDING_LAYER_TYPES]


def make_dictionary(
    model,
    *,
    n_atoms=None,
    kind="random",
    key_space="post_rope",
    encoder="topk",
    per_head=False,
    seed=0,
    k_key=None,
    k_value=None,
) -> KVDictionary:
    """``kind="exact"``: the complete signed basis (N = 2d atoms ±e_i), which Top-K with k = d reproduces exactly.
    ``kind="random"``: random unit atoms (lossy codes, for parity tests between two paths)."""
    config = model.config
    heads, d, layers = model_geometry(config)
    n_atoms = 2 * d if kind == "exact" else (n_atoms or 4 * d)
    meta = KVDictionaryConfig(
        base_model=f"tiny-{config.model_type}",
        num_layers=config.num_hidden_layers,
        layer_indices=layers,
        num_kv_heads=heads,
        head_dim=d,
        n_atoms=n_atoms,
        per_head=per_head,
        k_key=k_key or (d if kind == "exact" else 4),
        k_value=k_value or (d if kind == "exact" else 6),
        key_space=key_space,
        encoder=encoder,
    )
    dictionary = KVDictionary(meta)
    generator = torch.Generator().manual_seed(seed)
    rotary = model.model.rotary_emb
    with torch.no_grad():
        for i in layers:
            layer = dictionary[i]
            for sae in list(layer.key) + list(layer.value):
                if kind == "exact":
                    sae.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)]))
                else:
                    sae.W_dec.copy_(torch.randn(n_atoms, d, generator=generator))
                    sae.normalize_decoder()
                    sae.b_dec.copy_(0.1 * torch.randn(d, generator=generator))
                if sae.W_enc is not None:
                    sae.W_enc.copy_(sae.W_dec.T)
            inv_freq = getattr(rotary, "full_attention_inv_freq", None)
            layer.rope_inv_freq.copy_(rotary.inv_freq if inv_freq is None else inv_freq)
    return dictionary


@pytest.fixture(params=list(ARCHITECTURES))
def arch(request) -> str:
    return request.param
