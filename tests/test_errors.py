"""Bad input gets a clear error that names the mismatch, before any token is generated (the table of bad inputs
is in test_validation.py); a call that fails leaves the cache as it was."""

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


def test_a_budget_that_stores_more_than_the_dense_vectors_warns():
    """Tiny llama: head_dim 16, N = 64 (uint8 indices), fp32: a dense key + value is 128 bytes per KV head."""
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 5))
    with pytest.warns(UserWarning, match="stores 164 bytes per token .* dense key and value it replaces take 128"):
        model(
            ids,
            **cache_kwargs(
                model, SparseSemanticCache(make_dictionary(model, key_space="pre_rope"), k_key=16, k_value=16)
            ),
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4/6: 50 bytes
        model(ids, **cache_kwargs(model, SparseSemanticCache(make_dictionary(model), k_key=4, k_value=6)))
        model(
            ids,
            **cache_kwargs(
                model,
                SparseSemanticCache(
                    make_dictionary(model),
                    k_key=16,
                    k_value=16,
                    coefficient_dtype=torch.float8_e4m3fn,
                    pack_indices=True,
                ),
            ),
        )


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
    cache = SparseSemanticCache(
        make_dictionary(model), residual_length=2, num_sink_tokens=0, encode_batch=1, config=model.config
    )
    hook = model.model.layers[1].self_attn.v_proj.register_forward_hook(
        lambda module, args, out: out.index_fill(1, torch.tensor([0]), float("nan"))
    )
    # Found when layer 2's update codes what left layer 1's window; retries leave layer 1 as it was: no key
    # codes without value codes pile up.
    with pytest.raises(ValueError, match="layer 1: non-finite value states reached the encoder"):
        model(torch.randint(1, VOCAB, (1, 6)), **cache_kwargs(model, cache))
    for _ in range(3):
        with pytest.raises(ValueError, match="layer 1: non-finite value states reached the encoder"):
            model(torch.randint(1, VOCAB, (1, 1)), **cache_kwargs(model, cache))
        layer = cache.layers[1]
        assert layer.get_seq_length() == 6 and layer.num_compressed == 0
        assert layer.codes["key"][0].shape[2] == layer.codes["value"][0].shape[2] == 0
    hook.remove()


def test_sae_encode_refuses_non_finite_input_and_bad_k():
    model = tiny_model("llama")
    sae = make_dictionary(model)[0].key[0]
    with pytest.raises(ValueError, match="non-finite"):
        sae.encode(torch.tensor([[float("inf")] * 16]), 4)
    with pytest.raises(ValueError, match="k must be between 1 and the number of atoms"):
        sae.encode(torch.randn(2, 16), 65)


# ------------------------------------------------------------------------------- a failed call changes nothing
def snapshot(layer) -> dict:
    """Every attribute of ``layer``; tensors (also inside ``codes``) as ``(object, clone)``, to tell a replaced
    tensor from one written into."""

    def held(value):
        if isinstance(value, torch.Tensor):
            return value, value.clone()
        if isinstance(value, (tuple, list)):
            return type(value)(held(v) for v in value)
        if isinstance(value, dict):
            return {k: held(v) for k, v in value.items()}
        return value

    return {name: held(value) for name, value in vars(layer).items()}


def assert_unchanged(layer, before: dict) -> None:
    def same(now, then, where):
        if (
            isinstance(then, tuple)
            and len(then) == 2
            and isinstance(then[1], torch.Tensor)
            and isinstance(now, torch.Tensor)
        ):
            assert now is then[0], where
            torch.testing.assert_close(now, then[1], rtol=0, atol=0, equal_nan=True, msg=where)
        elif isinstance(then, (tuple, list)):
            assert len(now) == len(then), where
            for i, (a, b) in enumerate(zip(now, then, strict=True)):
                same(a, b, f"{where}[{i}]")
        elif isinstance(then, dict):
            assert now.keys() == then.keys(), where
            for key in then:
                same(now[key], then[key], f"{where}[{key!r}]")
        else:
            assert now is then or now == then, where

    assert vars(layer).keys() == before.keys()
    for name, then in before.items():
        same(getattr(layer, name), then, name)


def prefilled_layer(values_nan_at: int | None = None):
    """Layer 1 of a tiny llama cache after a 6-token update that nothing has encoded yet (window 2, so the next
    update encodes 4 tokens); ``values_nan_at`` puts a NaN into that token's value."""
    model = tiny_model("llama")
    cache = SparseSemanticCache(
        make_dictionary(model),
        residual_length=2,
        num_sink_tokens=0,
        encode_batch=1,
        config=model.config,
        backend="torch",
    )
    keys, values = torch.randn(2, 1, 2, 6, 16).unbind(0)
    if values_nan_at is not None:
        values[:, :, values_nan_at, 0] = float("nan")
    layer = cache.layers[1]
    layer.update(keys, values)
    return layer


def assert_consistent(layer, tokens: int) -> None:
    keys, values = layer.dense_keys_values()
    assert layer.get_seq_length() == keys.shape[2] == values.shape[2] == tokens
    assert layer.codes["key"][0].shape[2] == layer.codes["value"][0].shape[2] == layer.num_compressed
    assert layer.memory()["code_bytes"] > 0


def test_an_encoder_failing_for_the_values_leaves_the_layer_as_it_was(monkeypatch):
    """The key codes are computed first; the value encoder then fails: no key code may stay behind, at the
    update (which encodes what left the window) or at an explicit flush; once the encoder works again, updates
    go on as if the failure had never happened."""
    from sta_cache.kernels import dispatch

    layer = prefilled_layer()
    encode = dispatch.encode

    def failing_for_values(x, sae, k, encoder, backend, pursuit="omp"):
        if k == layer.k["value"]:
            raise RuntimeError("kernel failed")
        return encode(x, sae, k, encoder, backend, pursuit)

    monkeypatch.setattr(dispatch, "encode", failing_for_values)
    before = snapshot(layer)
    for _ in range(2):  # a retry must not pile up key codes either
        with pytest.raises(RuntimeError, match="kernel failed"):
            layer.update(*torch.randn(2, 1, 2, 1, 16).unbind(0))
        assert_unchanged(layer, before)
        with pytest.raises(RuntimeError, match="kernel failed"):
            layer.flush()
        assert_unchanged(layer, before)
    monkeypatch.setattr(dispatch, "encode", encode)
    layer.update(*torch.randn(2, 1, 2, 1, 16).unbind(0))
    assert layer.num_compressed == 4
    assert_consistent(layer, 7)


def test_non_finite_values_leave_the_layer_as_it_was():
    """The issue's case: a NaN value reaches the encoder after the keys of the same tokens were coded."""
    layer = prefilled_layer(values_nan_at=1)
    before = snapshot(layer)
    for _ in range(3):
        with pytest.raises(ValueError, match="non-finite value states reached the encoder"):
            layer.update(*torch.randn(2, 1, 2, 1, 16).unbind(0))
        assert_unchanged(layer, before)
    assert layer.get_seq_length() == 6 and layer.num_compressed == 0
    layer.crop(1)  # dropping the poisoned tokens makes the layer usable again
    layer.update(*torch.randn(2, 1, 2, 4, 16).unbind(0))
    layer.flush()
    assert_consistent(layer, 5)


def test_failed_batch_edits_leave_the_layer_as_it_was():
    layer = prefilled_layer()
    layer.flush()
    before = snapshot(layer)
    with pytest.raises(IndexError):
        layer.reorder_cache(torch.tensor([3]))
    with pytest.raises(RuntimeError):
        layer.observe(torch.arange(2).view(1, 2), torch.ones(2, 2, dtype=torch.bool))  # 2 rows, 1 in the cache
    assert_unchanged(layer, before)
