"""Compact storage: bit-packed indices, float8 coefficients and coefficients as levels on a float8 scale."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, make_dictionary, tiny_model
from sta_cache import SparseSemanticCache
from sta_cache.compat import cache_kwargs
from sta_cache.packing import (
    level_row_bytes,
    levels_clip,
    pack_indices,
    pack_levels,
    packed_bytes,
    unpack_indices,
    unpack_levels,
)


@pytest.mark.parametrize(
    "n_atoms,k",
    [(2, 1), (256, 8), (1000, 7), (1024, 16), (16384, 64), (5, 3), (65536, 3), (32768, 9), (8, 64), (4096, 5)],
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


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("k", [1, 3, 8, 16])
def test_levels_round_trip_to_the_nearest_step_of_the_smallest_scale_that_fits(bits, k):
    """Each vector's scale is the smallest float8 at or above max |c| / (2^(b-1) - 1), so no coefficient clips,
    and each coefficient comes back within half a step; all-zero vectors come back zero."""
    g = torch.Generator().manual_seed(bits * 100 + k)
    coefficients = torch.randn(4, 3, 50, k, generator=g) * torch.rand(4, 3, 50, 1, generator=g) * 10
    coefficients[0, 0, 0] = 0
    rows = pack_levels(coefficients, bits)
    assert rows.dtype == torch.uint8 and rows.shape == (4, 3, 50, level_row_bytes(k, bits))
    back = unpack_levels(rows, k, bits)
    scale = rows[..., :1].contiguous().view(torch.float8_e4m3fn).float()
    top = 2 ** (bits - 1) - 1
    needed = coefficients.abs().amax(-1, keepdim=True) / top
    assert (scale >= needed).all()
    below = (rows[..., :1].contiguous() - 1).view(torch.float8_e4m3fn).float()  # the next float8 down
    assert (below[needed > 0] < needed[needed > 0]).all()
    assert ((back - coefficients).abs() <= scale / 2 + 1e-6 * scale).all()
    assert torch.equal(back[0, 0, 0], torch.zeros(k))
    assert not levels_clip(coefficients, bits) and levels_clip(coefficients * 1e5, bits)
    with pytest.raises(ValueError, match="2 to 8 bits"):
        pack_levels(coefficients, 9)


def test_coefficient_levels_store_their_bits_and_stay_close():
    """coefficient_bits=b stores 1 + ceil(k b / 8) bytes per vector (memory_footprint counts exactly that), read
    back through the C kernels; 8-bit levels are closer to float32 coefficients than 4-bit ones."""
    model = tiny_model("llama", "sta")
    dictionary = make_dictionary(model, encoder="omp")
    ids = torch.randint(1, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    logits, code_bytes = {}, {}
    for bits in (None, 8, 4):
        cache = SparseSemanticCache(
            dictionary, residual_length=4, config=model.config, coefficient_bits=bits, backend="cpu"
        )
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
            logits[bits] = model(ids[:, :1], **cache_kwargs(model, cache)).logits
        code_bytes[bits] = cache.memory_footprint()["code_bytes"]
        layer = cache.sparse_layers[0]
        stored = layer.codes["key"][1]
        if bits:
            assert stored.dtype == torch.uint8 and stored.shape[-1] == level_row_bytes(layer.k["key"], bits)
    vectors = sum(layer.num_compressed for layer in cache.sparse_layers) * 2  # batch 1, 2 KV heads
    per_vector = {kind: (k, level_row_bytes(k, 4)) for kind, k in layer.k.items()}
    assert code_bytes[None] - code_bytes[4] == vectors * sum(4 * k - row for k, row in per_vector.values())
    error = {bits: ((logits[None] - logits[bits]).norm() / logits[None].norm()).item() for bits in (8, 4)}
    assert 0 < error[8] < error[4] < 0.1
    with pytest.warns(RuntimeWarning, match="layer 0: coefficients beyond the range of 4-bit levels"):
        layer._encode("key", torch.full((1, 2, 1, 16), 1e6))
