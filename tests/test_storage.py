"""Compact storage: bit-packed indices and float8 coefficients."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, make_dictionary, tiny_model
from sta_cache import SparseSemanticCache
from sta_cache.compat import cache_kwargs
from sta_cache.packing import pack_indices, packed_bytes, unpack_indices


@pytest.mark.parametrize(
    "n_atoms,k", [(2, 1), (256, 8), (1000, 7), (1024, 16), (16384, 64), (5, 3), (65536, 3), (32768, 9)]
)
def test_pack_round_trip(n_atoms, k):
    indices = torch.randint(0, n_atoms, (3, 2, 5, k))
    indices[0, 0, 0, 0] = n_atoms - 1
    packed = pack_indices(indices, n_atoms)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == packed_bytes(k, n_atoms)
    assert torch.equal(unpack_indices(packed, k, n_atoms), indices)


def test_packed_indices_give_the_same_logits_in_fewer_bytes():
    model = tiny_model("llama", "sta")
    dictionary = make_dictionary(model, n_atoms=48)  # 6 bits per index instead of 8
    ids = torch.randint(1, VOCAB, (2, 30))
    results = {}
    for pack in (False, True):
        cache = SparseSemanticCache(dictionary, residual_length=4, config=model.config, pack_indices=pack)
        with torch.no_grad():
            model(ids[:, :29], **cache_kwargs(model, cache))
            results[pack] = (model(ids[:, 29:], **cache_kwargs(model, cache)).logits, cache.memory_footprint())
    assert torch.equal(results[False][0], results[True][0])
    index_bytes = {pack: results[pack][1]["code_bytes"] for pack in results}
    layer_tokens = 3 * 2 * 2 * cache.sparse_layers[0].num_compressed  # layers x batch x KV heads x tokens
    assert layer_tokens == 3 * 2 * 2 * (30 - 4 - 4)  # 4 sinks, a window of 4
    saved = layer_tokens * ((4 - packed_bytes(4, 48)) + (6 - packed_bytes(6, 48)))
    assert index_bytes[False] - index_bytes[True] == saved


def test_float8_coefficients_are_close_and_never_overflow():
    model = tiny_model("llama", "sta")
    dictionary = make_dictionary(model, encoder="omp")
    ids = torch.randint(1, VOCAB, (1, 30))
    logits = {}
    for dtype in (None, torch.float8_e4m3fn):
        cache = SparseSemanticCache(dictionary, residual_length=4, config=model.config, coefficient_dtype=dtype)
        with torch.no_grad():
            logits[dtype] = model(ids, **cache_kwargs(model, cache)).logits
            logits[dtype] = model(ids[:, :1], **cache_kwargs(model, cache)).logits
    layer = cache.sparse_layers[0]
    assert layer.codes["key"][1].dtype == torch.float8_e4m3fn
    with pytest.warns(RuntimeWarning, match="layer 0: coefficients beyond the range of torch.float8_e4m3fn"):
        huge = layer._encode("key", torch.full((1, 2, 1, 16), 1e4))[1]
    assert torch.isfinite(huge.float()).all() and huge.float().abs().max() == 448
    error = ((logits[None] - logits[torch.float8_e4m3fn]).norm() / logits[None].norm()).item()
    assert 0 < error < 0.05
