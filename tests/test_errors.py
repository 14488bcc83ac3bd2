"""Bad input gets a clear error that names the mismatch, before any token is generated."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DeepseekV3Config

from conftest import VOCAB, make_dictionary, tiny_model
from sta_cache import SparseSemanticCache, UnsupportedModelError
from sta_cache.compat import cache_kwargs


def test_dictionary_for_another_geometry_is_refused_at_construction():
    llama, qwen2 = tiny_model("llama"), tiny_model("qwen2")  # head_dim 16 vs 64 // 4 = 16, same heads...
    gemma = tiny_model("gemma3")
    with pytest.raises(UnsupportedModelError, match="head_dim 16 .dictionary: 32"):
        SparseSemanticCache(make_dictionary(gemma), config=llama.config)
    with pytest.raises(UnsupportedModelError, match="3 layers .dictionary: 4"):
        SparseSemanticCache(make_dictionary(gemma), config=qwen2.config)
    with pytest.raises(UnsupportedModelError, match="2 KV heads .dictionary: 1"):
        SparseSemanticCache(make_dictionary(gemma), config=llama.config)


def test_wrong_head_dim_without_config_fails_on_the_first_forward():
    llama, gemma = tiny_model("llama"), tiny_model("gemma3")
    cache = SparseSemanticCache(make_dictionary(gemma))
    with pytest.raises(ValueError, match="head_dim is 16 but the dictionary was made for head_dim 32"):
        llama(torch.randint(1, VOCAB, (1, 5)), **cache_kwargs(llama, cache))


def test_extra_model_layers_without_config_are_refused():
    model = tiny_model("llama")
    dictionary = make_dictionary(model)
    dictionary.config.num_layers = 2  # as if made for a shallower model
    cache = SparseSemanticCache(dictionary)
    with pytest.raises(ValueError, match="the model has a layer 2 .* covers 2 layers"):
        model(torch.randint(1, VOCAB, (1, 5)), **cache_kwargs(model, cache))


@pytest.mark.parametrize("budget", [dict(k_key=65), dict(k_value=0)])
def test_budget_outside_the_dictionary_is_refused(budget):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="must be between 1 and the dictionary's N=64"):
        SparseSemanticCache(make_dictionary(model), config=model.config, **budget)


def test_a_budget_that_stores_more_than_the_dense_vectors_warns():
    """Tiny llama: head_dim 16, N = 64 (uint8 indices), fp32: a dense key + value is 128 bytes per KV head."""
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 5))
    with pytest.warns(UserWarning, match="stores 164 bytes per token .* dense key and value it replaces take 128"):
        model(ids, **cache_kwargs(model, SparseSemanticCache(make_dictionary(model, key_space="pre_rope"), k_key=16,
                                                             k_value=16)))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4/6: 50 bytes
        model(ids, **cache_kwargs(model, SparseSemanticCache(make_dictionary(model), k_key=4, k_value=6)))
        model(ids, **cache_kwargs(model, SparseSemanticCache(make_dictionary(model), k_key=16, k_value=16,
                                                             coefficient_dtype=torch.float8_e4m3fn,
                                                             pack_indices=True)))  # fmt: skip


def test_multi_head_latent_attention_is_unsupported():
    model = tiny_model("llama")
    mla = DeepseekV3Config(num_hidden_layers=3, num_key_value_heads=2, hidden_size=64, num_attention_heads=4)
    with pytest.raises(UnsupportedModelError, match="multi-head latent attention"):
        SparseSemanticCache(make_dictionary(model), config=mla)


def test_sliding_layers_with_saes_are_refused():
    gemma = tiny_model("gemma3")
    dictionary = make_dictionary(gemma)
    dictionary.config.layer_indices = [0, 1, 3]
    with pytest.raises(UnsupportedModelError, match=r"layers \[0\] are sliding-window layers"):
        SparseSemanticCache(dictionary, config=gemma.config)


def test_non_finite_states_never_reach_the_codes():
    model = tiny_model("llama")
    cache = SparseSemanticCache(make_dictionary(model), residual_length=2, num_sink_tokens=0, encode_batch=1,
                                config=model.config)  # fmt: skip
    hook = model.model.layers[1].self_attn.v_proj.register_forward_hook(
        lambda module, args, out: out.index_fill(1, torch.tensor([0]), float("nan"))
    )
    with pytest.raises(ValueError, match="layer 1: non-finite value states reached the encoder"):
        model(torch.randint(1, VOCAB, (1, 6)), **cache_kwargs(model, cache))
    hook.remove()


def test_sae_encode_refuses_non_finite_input_and_bad_k():
    model = tiny_model("llama")
    sae = make_dictionary(model)[0].key[0]
    with pytest.raises(ValueError, match="non-finite"):
        sae.encode(torch.tensor([[float("inf")] * 16]), 4)
    with pytest.raises(ValueError, match="k must be between 1 and the number of atoms"):
        sae.encode(torch.randn(2, 16), 65)
