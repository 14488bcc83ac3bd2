"""Training dictionaries (sta_cache.collect + sta_cache.training) on a tiny random-init Llama: fast, seconds each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from char_text import VOCAB, CharTokenizer, tiny_llama, write_words
from safetensors.torch import load_file
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, LlamaForCausalLM

from sta_cache import KVDictionary, SparseSemanticCache
from sta_cache.collect import iter_kv, rotary_for_layer, token_windows, verify_rotary
from sta_cache.compat import cache_kwargs
from sta_cache.geometry import compressible_layers
from sta_cache.kernels.reference import apply_rope
from sta_cache.training import TrainConfig, checkpoint, evaluate_dictionary, train_dictionary


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: one thread avoids thread-pool overhead (large on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_words(tmp_path_factory.mktemp("text") / "text.txt")


def small_config(**overrides) -> TrainConfig:
    base = dict(
        method="sae",
        key_space="post_rope",
        n_atoms=64,
        k_key=4,
        k_value=6,
        context=64,
        max_tokens=2048,
        eval_tokens=512,
        batch_size=128,
        buffer_size=1024,
        epochs=4.0,
        lr=4e-3,
        warmup_steps=5,
        dead_steps=8,
        log_every=5,
        checkpoint_every=10,
        eval_vectors=512,
        eval_vectors_omp=128,
        seed=3,
    )
    base.update(overrides)
    return TrainConfig(**base)


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "dictionary.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def trained(model, text, tmp_path_factory) -> Path:
    """One uninterrupted post-RoPE run, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("run") / "reference"
    train_dictionary(model, CharTokenizer(), text, small_config(), out, resume=False, progress=False)
    return out


# ------------------------------------------------------------------------------------------------ collection
def test_token_windows_are_disjoint_and_start_with_bos(text):
    tokenizer = CharTokenizer()
    first = token_windows(tokenizer, text, 32, 4)
    later = token_windows(tokenizer, text, 32, 2, skip_windows=2)
    assert first.shape == (4, 32) and (first[:, 0] == 1).all()
    assert torch.equal(first[2:], later)


@pytest.mark.parametrize("per_head", [False, True])
def test_collection_matches_dynamic_cache_and_pre_rope_round_trips(model, per_head):
    """Post-RoPE vectors are exactly what a DynamicCache holds; pre-RoPE keys rotate back onto them."""
    ids = torch.randint(3, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache), use_cache=True)
    layers = compressible_layers(model.config)
    post = list(iter_kv(model, ids, key_space="post_rope", per_head=per_head, batch_windows=2))
    pre = list(iter_kv(model, ids, key_space="pre_rope", per_head=per_head, batch_windows=2))
    positions = torch.arange(20).expand(3, 20)

    def unflatten(batches, attr, i):  # [Hd, n, d] per forward -> [B, H, C, d]
        parts = []
        for batch in batches:
            x = getattr(batch, attr)[i]
            b = batch.tokens // 20
            if per_head:
                parts.append(x.view(2, b, 20, 16).permute(1, 0, 2, 3))
            else:
                parts.append(x.view(b, 20, 2, 16).permute(0, 2, 1, 3))
        return torch.cat(parts)

    for i in layers:
        keys, values = cache.layers[i].keys, cache.layers[i].values
        assert torch.equal(unflatten(post, "keys", i), keys)
        assert torch.equal(unflatten(post, "values", i), values)
        inv_freq, scaling = rotary_for_layer(model, i)
        assert torch.equal(inv_freq, model.model.rotary_emb.inv_freq)
        rotated = apply_rope(unflatten(pre, "keys", i), positions, inv_freq, scaling)
        assert (rotated - keys).abs().max() < 1e-5 * keys.abs().max()
        assert not torch.allclose(unflatten(pre, "keys", i), keys, atol=1e-3)  # really un-rotated


def test_rotary_for_gemma3_layer_types_and_wrong_frequencies_are_caught():
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=8,
        max_position_embeddings=512,
        query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    gemma = Gemma3ForCausalLM(config).eval()
    layers = compressible_layers(gemma.config)
    assert layers == [1, 3]
    rotary = {i: rotary_for_layer(gemma, i) for i in layers}
    assert torch.equal(rotary[1][0], gemma.model.rotary_emb.full_attention_inv_freq)
    assert not torch.equal(rotary_for_layer(gemma, 0)[0], rotary[1][0])  # the local rotary differs
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    verify_rotary(gemma, ids, layers, rotary)
    with pytest.raises(AssertionError, match="pre-RoPE keys"):
        verify_rotary(gemma, ids, layers, {i: (f * 1.05, s) for i, (f, s) in rotary.items()})


# ------------------------------------------------------------------------------------------------ training
def test_training_lowers_heldout_fvu_and_keeps_unit_atoms(trained, model, text):
    records = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    init = next(r for r in records if r["event"] == "heldout" and r["tag"] == "init")
    final = next(r for r in records if r["event"] == "heldout" and r["tag"] == "final" and r["encoder"] == "topk")
    assert any(r["event"] == "train" and "dead" in r["layers"]["0"]["key"] for r in records)
    for layer in ("0", "1"):
        for kind in ("key", "value"):
            before, after = init["layers"][layer][kind]["fvu"], final["layers"][layer][kind]["fvu"]
            assert after < 0.6 * before and after < 0.3, (layer, kind, before, after)
    dictionary = KVDictionary.from_pretrained(trained)
    for i in dictionary.config.layer_indices:
        for sae in list(dictionary[i].key) + list(dictionary[i].value):
            assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.n_atoms), atol=1e-5)
    # the recorded evaluation agrees with an independent one on freshly collected held-out vectors
    windows = token_windows(CharTokenizer(), text, 64, 8, skip_windows=32)
    batch = next(iter_kv(model, windows, skip_first=4, batch_windows=8))
    measured = evaluate_dictionary(dictionary, {i: (batch.keys[i], batch.values[i]) for i in (0, 1)})
    summary = dictionary.config.evaluation
    for kind in ("key", "value"):
        mean_cos = sum(measured[i][kind]["cos"] for i in (0, 1)) / 2
        assert abs(mean_cos - summary[f"{kind}_cosine_topk"]) < 0.02
        assert summary[f"{kind}_cosine_omp"] >= summary[f"{kind}_cosine_topk"] - 0.01


def test_same_seed_gives_same_weights_and_finished_run_is_reused(trained, model, text, tmp_path):
    again = tmp_path / "again"
    train_dictionary(model, CharTokenizer(), text, small_config(), again, resume=False, progress=False)
    assert_same_weights(trained, again)
    other = tmp_path / "other_seed"
    train_dictionary(model, CharTokenizer(), text, small_config(seed=4), other, progress=False)
    assert not torch.equal(load_weights(trained)["layers.0.key.0.W_dec"], load_weights(other)["layers.0.key.0.W_dec"])
    before = (again / "dictionary.safetensors").stat().st_mtime_ns
    train_dictionary(model, CharTokenizer(), text, small_config(), again, resume=True, progress=False)
    assert (again / "dictionary.safetensors").stat().st_mtime_ns == before  # finished: loaded, not retrained


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("interrupt_at", [1, 3, "tail"])
def test_resume_after_interruption_gives_the_same_weights(trained, model, text, tmp_path, monkeypatch, interrupt_at):
    """Interrupted while the text streams in (1st or 3rd checkpoint), or in the training that follows the stream
    when the reservoir holds all the data ("tail"): the resumed run ends with the same weights and log."""
    overrides = {}
    if interrupt_at == "tail":
        overrides, interrupt_at = {"buffer_size": 4096}, 2
        reference = tmp_path / "reference"
        train_dictionary(model, CharTokenizer(), text, small_config(**overrides), reference, progress=False)
        trained = reference
    out = tmp_path / "interrupted"
    real_save = checkpoint.save_checkpoint
    calls = []

    def save_then_die(path, payload):
        real_save(path, payload)
        calls.append(path)
        if len(calls) == interrupt_at:
            raise Interrupted

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train_dictionary(model, CharTokenizer(), text, small_config(**overrides), out, progress=False)
    assert (out / "checkpoint.pt").is_file() and not (out / "dictionary.safetensors").exists()
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    with pytest.raises(ValueError, match="different run"):
        train_dictionary(model, CharTokenizer(), text, small_config(lr=1e-3, **overrides), out, progress=False)
    train_dictionary(model, CharTokenizer(), text, small_config(**overrides), out, progress=False)
    assert_same_weights(trained, out)
    assert not (out / "checkpoint.pt").exists()
    log = (out / "train_log.jsonl").read_text().splitlines()
    reference_log = (trained / "train_log.jsonl").read_text().splitlines()
    steps = lambda lines: [(r["event"], r["step"]) for r in map(json.loads, lines)]  # noqa: E731
    assert steps(log) == steps(reference_log)


def test_pre_rope_per_head_dictionary_saves_loads_and_runs_in_the_cache(model, text, tmp_path):
    out = tmp_path / "pre_rope"
    config = small_config(key_space="pre_rope", per_head=True, encoder="omp", max_tokens=1024, epochs=2.0)
    trained = train_dictionary(model, CharTokenizer(), text, config, out, progress=False)
    dictionary = KVDictionary.from_pretrained(out)
    meta = dictionary.config
    assert meta.key_space == "pre_rope" and meta.per_head and meta.encoder == "omp"
    assert meta.n_atoms == 64 and (meta.k_key, meta.k_value) == (4, 6)
    assert meta.training["tokens"] == 1024 and meta.training["context"] == 64 and meta.training["seed"] == 3
    assert {"key_cosine_topk", "value_fvu_omp", "key_cosine_omp_worst"} <= set(meta.evaluation)
    assert len(dictionary[0].key) == 2
    for i in meta.layer_indices:
        assert torch.equal(dictionary[i].rope_inv_freq, model.model.rotary_emb.inv_freq)
        assert torch.equal(dictionary[i].key[1].W_dec, trained[i].key[1].W_dec)
    cache = SparseSemanticCache(dictionary, config=model.config, residual_length=8, num_sink_tokens=2)
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(model, cache), use_cache=True).logits
        logits = model(ids[:, :1], **cache_kwargs(model, cache), use_cache=True).logits
    assert torch.isfinite(logits).all()
    assert all(layer.num_compressed > 0 for layer in cache.sparse_layers)
