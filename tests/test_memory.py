"""The cache holds what it reports: bytes counted from storages after every kind of use, on both attention paths."""

from __future__ import annotations

import gc
import weakref
from unittest.mock import patch

import pytest
import torch

from conftest import VOCAB, make_dictionary, tiny_model
from sta_cache import SparseSemanticCache
from sta_cache.compat import cache_kwargs
from sta_cache.layer import SparseSemanticLayer
from sta_cache.memory import owned, storage_bytes

NOT_PER_SEQUENCE = {"dictionary", "sae", "rope_inv_freq"}  # the dictionaries: shared, reported apart


def test_storage_bytes_counts_each_storage_once_and_whole():
    x = torch.zeros(10, 4)
    assert storage_bytes([x, x, {"again": x}]) == 160
    assert storage_bytes((torch.zeros(3, dtype=torch.uint8), "meta", 5, None)) == 3
    assert storage_bytes(x[:2]) == 160  # a slice keeps its whole storage alive
    assert storage_bytes([x[:2], x[5:]]) == 160


def test_owned_copies_only_views_of_larger_storages():
    x = torch.randn(2, 3, 10, 4)
    assert owned(x) is x
    window = owned(x[:, :, 7:])
    assert torch.equal(window, x[:, :, 7:]) and storage_bytes(window) == window.numel() * 4
    assert storage_bytes(owned(x[:, :, :0])) == 0


def held_bytes(cache) -> int:
    """Every storage reachable from the cache's layers except the shared dictionaries, each once."""
    seen = set()
    return sum(
        storage_bytes(value, seen)
        for layer in cache.layers
        for name, value in vars(layer).items()
        if name not in NOT_PER_SEQUENCE
    )


def reported_bytes(cache) -> int:
    footprint = cache.memory_footprint()
    return footprint["code_bytes"] + footprint["dense_bytes"]


def assert_holds_what_it_reports(cache) -> None:
    """Everything reachable is reported (within 2%), and no stored tensor keeps a larger storage alive."""
    reported, held = reported_bytes(cache), held_bytes(cache)
    assert reported <= held <= 1.02 * reported, (held, reported)
    for layer in cache.sparse_layers:
        stored = [t for t in (*layer.dense_tensors(), *layer.code_tensors()) if t is not None]
        assert all(storage_bytes(t) == t.numel() * t.element_size() for t in stored)


STORAGES = {"fp32": {}, "fp8+packed": {"coefficient_dtype": torch.float8_e4m3fn, "pack_indices": True}}


@pytest.mark.parametrize("storage", list(STORAGES))
@pytest.mark.parametrize("attn", ["sta", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_generate_holds_what_it_reports(arch, attn, storage):
    """generate from a prompt longer than the window: greedy, a left-padded batch, beam search; then crop,
    batch edits and reset."""
    model = tiny_model(arch, attn)
    dictionary = make_dictionary(model, key_space="pre_rope", encoder="omp")

    def make():
        return SparseSemanticCache(
            dictionary, residual_length=8, num_sink_tokens=2, encode_batch=4, config=model.config, **STORAGES[storage]
        )

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 60), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    runs = {
        "greedy": dict(input_ids=ids[:1], max_new_tokens=12, do_sample=False),
        "left padding": dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False),
        "chunked prefill": dict(input_ids=ids[:1], max_new_tokens=8, prefill_chunk_size=16, do_sample=False),
        "beam search": dict(input_ids=ids[:1], max_new_tokens=8, num_beams=3, do_sample=False),
    }
    for kwargs in runs.values():  # beam search last: the batch edits below need its 3 rows
        cache = make()
        with torch.no_grad():
            model.generate(**kwargs, **cache_kwargs(model, cache), pad_token_id=0)
        assert all(layer.num_compressed > 0 for layer in cache.sparse_layers)
        assert_holds_what_it_reports(cache)
    if arch == "llama":  # transformers' own sliding-window layers (Gemma-3) refuse a crop once full
        cache.crop(-3)
        assert_holds_what_it_reports(cache)
        cache.crop(cache.get_seq_length() - 20)  # deep into the codes
        assert_holds_what_it_reports(cache)
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([0, 3]))
    cache.reorder_cache(torch.tensor([1, 0]))
    assert_holds_what_it_reports(cache)
    cache.reset()
    # nothing left but transformers' sliding layers' window size, which they keep as an 8-byte tensor
    assert reported_bytes(cache) == 0 and held_bytes(cache) <= 8 * len(cache.layers)


@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("attn", ["sta", "sdpa"])
def test_prefill_leaves_no_dense_prompt_behind(attn, chunk):
    """Right after a prefill (whole, or chunked) every layer has coded what left its window, with no flush in
    between: it holds sinks + window densely, never the prompt, and the prompt's key and value tensors are freed.
    On the "sta" path that holds for every layer; with sdpa for every layer but the last, whose attention runs
    after the cache's last update (it is coded at the next forward)."""
    model = tiny_model("llama", attn)
    cache = SparseSemanticCache(
        make_dictionary(model, encoder="omp"), residual_length=8, num_sink_tokens=2, encode_batch=4, config=model.config
    )
    prompt_states = []
    update = SparseSemanticLayer.update

    def watched_update(layer, key_states, value_states, *args, **kwargs):
        prompt_states.extend([weakref.ref(key_states), weakref.ref(value_states)])
        return update(layer, key_states, value_states, *args, **kwargs)

    ids = torch.randint(1, VOCAB, (1, 96))
    with torch.no_grad(), patch.object(SparseSemanticLayer, "update", watched_update):
        for start in range(0, 96, chunk or 96):
            model(ids[:, start : start + (chunk or 96)], **cache_kwargs(model, cache))
    gc.collect()
    layers = cache.layers if attn == "sta" else cache.layers[:-1]
    heads, d = model.config.num_key_value_heads, model.config.head_dim
    for layer in layers:
        assert isinstance(layer, SparseSemanticLayer)
        assert layer.num_sinks == 2 and layer.num_window < 8 + 4
        dense_states = storage_bytes([layer.sink_keys, layer.sink_values, layer.keys, layer.values])
        assert dense_states == 2 * heads * d * 4 * (layer.num_sinks + layer.num_window)
    alive = [ref for ref in prompt_states if ref() is not None]
    assert len(alive) <= (0 if attn == "sta" else 2), "the prompt's dense keys/values are still referenced"
    assert_holds_what_it_reports(cache)


def test_caches_share_one_copy_of_the_dictionary():
    model = tiny_model("llama", "sta")
    shared, per_head = make_dictionary(model, encoder="omp"), make_dictionary(model, encoder="omp", per_head=True)
    ids = torch.randint(1, VOCAB, (1, 30))
    caches = {}
    for name, dictionary in (("shared", shared), ("per_head", per_head)):
        caches[name] = [SparseSemanticCache(dictionary, residual_length=8, num_sink_tokens=2) for _ in range(3)]
        with torch.no_grad():
            for cache in caches[name]:
                model(ids, **cache_kwargs(model, cache))
        seen = set()
        held = [storage_bytes([layer.sae for layer in cache.sparse_layers], seen) for cache in caches[name]]
        assert held[0] > 0 and held[1:] == [0, 0]  # the second and third cache add nothing
        footprints = {cache.memory_footprint()["dictionary_bytes"] for cache in caches[name]}
        assert len(footprints) == 1
    # a float32 dictionary shared by the KV heads is read in place: no copy at all
    atoms = caches["shared"][0].sparse_layers[0].sae["key"]["W_dec"]
    assert atoms.untyped_storage().data_ptr() == shared[0].key[0].W_dec.untyped_storage().data_ptr()
    with torch.no_grad():
        per_head[0].key[1].W_dec.mul_(0.5)  # a changed dictionary is never served stale
    fresh = SparseSemanticCache(per_head, residual_length=8, num_sink_tokens=2)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, fresh))
    assert torch.equal(fresh.sparse_layers[0].sae["key"]["W_dec"][1], per_head[0].key[1].W_dec)
