"""The quantizer baselines of `sta-cache eval` (sta_cache.baselines) against float references on fresh random data,
and as caches on a tiny Llama: generate works and the bytes are what their formats say."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import VOCAB, tiny_model
from sta_cache.baselines import KiviCache, RotatedQuantizedCache
from sta_cache.baselines.kivi import dequantize_groups, quantize_groups
from sta_cache.baselines.rotated import RotatedQuantizer, split_bits
from sta_cache.compat import cache_kwargs
from sta_cache.evaluation import cache_bytes, feed
from sta_cache.lloyd_max import sphere_coordinate_codebook
from sta_cache.packing import pack_indices, unpack_indices
from sta_cache.rotated_values import haar_rotation

# Lloyd-Max quantization of N(0, 1) (Max 1960): the positive centroids and the mean squared error at b bits.
GAUSSIAN_CENTROIDS = {1: [0.7979], 2: [0.4528, 1.5104], 3: [0.2451, 0.7560, 1.3439, 2.1520]}
GAUSSIAN_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ============================================================================================ Lloyd-Max codebook
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_codebook_of_a_rotated_coordinate_tends_to_gaussian_lloyd_max(bits):
    # A coordinate of a random unit vector in d dimensions is ~ N(0, 1/d) for large d.
    d = 2048
    codebook = sphere_coordinate_codebook(d, bits) * math.sqrt(d)
    assert len(codebook) == 2**bits and torch.all(codebook[1:] > codebook[:-1])
    assert codebook[2 ** (bits - 1) :].tolist() == pytest.approx(GAUSSIAN_CENTROIDS[bits], rel=5e-3)
    assert codebook.tolist() == pytest.approx((-codebook.flip(0)).tolist(), abs=1e-5)


def test_codebook_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="head_dim must be at least 3"):
        sphere_coordinate_codebook(2, 2)
    with pytest.raises(ValueError, match="between 1 and 8"):
        sphere_coordinate_codebook(64, 9)


# ============================================================================================ rotated quantizer
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_rotated_quantizer_mse_matches_the_gaussian_lloyd_max_distortion(bits):
    d = 128
    x = torch.randn(4096, d, generator=_generator(bits)) * 2.5  # isotropic: every direction equally likely
    quantizer = RotatedQuantizer(haar_rotation(d, _generator(100 + bits)), bits)
    error = (x - quantizer.dequantize(quantizer.quantize(x))).pow(2).sum(-1) / x.pow(2).sum(-1)
    # the exact coordinate density is a little lighter-tailed than the Gaussian: a little below its distortion
    assert error.mean().item() == pytest.approx(GAUSSIAN_MSE[bits], rel=0.04)


def test_fractional_rate_splits_channels_and_distortion():
    d = 64
    assert split_bits(2.5, d) == (2, 32) and split_bits(3.25, d) == (3, 16) and split_bits(3, d) == (3, 0)
    with pytest.raises(ValueError, match="whole number"):
        split_bits(2.3, d)
    x = torch.randn(8192, d, generator=_generator(7))
    quantizer = RotatedQuantizer(haar_rotation(d, _generator(8)), 2.5)
    stored = quantizer.quantize(x)
    # 32 channels at 3 bits, 32 at 2 bits, a float16 norm: 12 + 8 + 2 bytes
    assert stored["wide"].shape == (8192, 12) and stored["narrow"].shape == (8192, 8)
    assert stored["norm"].dtype == torch.float16 and stored["wide"].dtype == torch.uint8
    error = (x - quantizer.dequantize(stored)).pow(2).sum(-1) / x.pow(2).sum(-1)
    assert error.mean().item() == pytest.approx((GAUSSIAN_MSE[2] + GAUSSIAN_MSE[3]) / 2, rel=0.05)


def test_rotated_quantizer_against_a_float_reference():
    """Dequantized = norm x R^T c[nearest centroid of (R x / |x|)], computed here without packing."""
    d, bits = 32, 3
    rotation = haar_rotation(d, _generator(3))
    assert torch.allclose(rotation @ rotation.T, torch.eye(d), atol=1e-5)
    x = torch.randn(500, d, generator=_generator(4)) * torch.linspace(0.1, 5, d)  # anisotropic too
    quantizer = RotatedQuantizer(rotation, bits)
    codebook = sphere_coordinate_codebook(d, bits).double()
    norm = x.double().norm(dim=-1, keepdim=True)
    y = (x.double() / norm) @ rotation.double().T
    nearest = codebook[(y.unsqueeze(-1) - codebook).abs().argmin(-1)]
    reference = (nearest @ rotation.double()) * norm.half().double()
    assert torch.allclose(quantizer.dequantize(quantizer.quantize(x)).double(), reference, atol=1e-4)
    zero = quantizer.dequantize(quantizer.quantize(torch.zeros(2, d)))
    assert torch.equal(zero, torch.zeros(2, d))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_packed_codes_round_trip_exactly(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 37), generator=_generator(bits))
    packed = pack_indices(codes, 2**bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == math.ceil(37 * bits / 8)
    assert torch.equal(unpack_indices(packed, 37, 2**bits), codes)


# ============================================================================================ KIVI
def test_kivi_groups_match_a_float_reference():
    g = torch.randn(6, 10, 32, generator=_generator(5)) * 3 + 1
    stored = quantize_groups(g, 2)
    assert stored["codes"].shape == (6, 10, 8) and stored["scale"].dtype == torch.float16
    zero, top = g.amin(-1), g.amax(-1)
    assert torch.equal(stored["zero"], zero.half())
    scale = ((top - zero.half().float()) / 3).half().float()
    reference = ((g - zero.half().float().unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 3)
    reference = reference * scale.unsqueeze(-1) + zero.half().float().unsqueeze(-1)
    back = dequantize_groups(stored, 32, 2)
    assert torch.allclose(back, reference, atol=1e-6)
    assert (back - g).abs().max() <= scale.max() / 2 + 1e-3  # within half a step
    constant = dequantize_groups(quantize_groups(torch.full((2, 32), 0.75), 2), 32, 2)
    assert torch.allclose(constant, torch.full((2, 32), 0.75), atol=1e-3)


def test_kivi_layer_groups_keys_per_channel_and_values_per_token(llama):
    cache = KiviCache(llama.config, 2, group=8, residual_length=4, num_sink_tokens=0)
    layer = cache.layers[0]
    keys = torch.randn(1, 2, 16, 16, generator=_generator(6))
    keys[:, :, 2, 3] += 100  # one outlier in channel 3 of the first token group: only that group's scale grows
    values = torch.randn(1, 2, 16, 16, generator=_generator(7))
    stored_keys, stored_values = layer.quantize("key", keys), layer.quantize("value", values)
    assert stored_keys["scale"].shape == (1, 2, 2, 16)  # [B, H, token groups, channels]
    assert stored_values["scale"].shape == (1, 2, 16, 2)  # [B, H, tokens, channel groups]
    for head in range(2):
        for group in range(2):
            block = keys[0, head, group * 8 : (group + 1) * 8]  # [8 tokens, 16 channels]
            assert torch.equal(stored_keys["zero"][0, head, group], block.amin(0).half())
        assert torch.equal(stored_values["zero"][0, head], values[0, head].view(16, 2, 8).amin(-1).half())
    assert stored_keys["scale"][0, :, 0, 3].min() > 20 and stored_keys["scale"][0, :, 1, 3].max() < 5
    assert (layer.dequantize("key", stored_keys) - keys).abs().max() < stored_keys["scale"].float().max() / 2 + 1e-2
    assert (layer.dequantize("value", stored_values) - values).abs().max() < 3


def test_kivi_refuses_a_group_that_does_not_divide_head_dim(llama):
    with pytest.raises(ValueError, match="group size dividing head_dim"):
        KiviCache(llama.config, 2, group=5)


# ============================================================================================ caches
def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=_generator(seed))


@pytest.mark.parametrize("bits", [2, 2.5, 3.5])
def test_rotated_cache_generates_and_stores_what_its_format_says(llama, bits):
    cache = RotatedQuantizedCache(llama.config, bits, seed=1, residual_length=8, num_sink_tokens=2, flush_tokens=4)
    out = llama.generate(_ids(30), **cache_kwargs(llama, cache), max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 42)
    counted = cache_bytes(cache)  # flushes: every token past the window is coded
    layers, heads, d = llama.config.num_hidden_layers, llama.config.num_key_value_heads, 16
    for layer in cache.layers:
        assert (layer.num_sinks, layer.num_compressed, layer.num_window) == (2, 41 - 2 - 8, 8)
    base, wide = split_bits(bits, d)
    per_vector = math.ceil(wide * (base + 1) / 8) + math.ceil((d - wide) * base / 8) + 2
    assert counted["codes"] == layers * 2 * heads * 31 * per_vector
    assert counted["dense"] == layers * 2 * heads * (2 + 8) * d * 4
    assert counted["bits_per_element"] == pytest.approx(8 * per_vector / d)
    assert counted["bits_per_element"] == pytest.approx(bits + 16 / d)
    # rotations (d x d float32, one per layer and kind) and the codebooks, counted once
    assert counted["dictionary"] == layers * 2 * (d * d * 4) + layers * 2 * 4 * (2 ** (base + 1) + 2**base) * (
        wide > 0
    ) + layers * 2 * 4 * 2**base * (wide == 0)


def test_rotated_cache_reads_back_what_a_float_reference_gives(llama):
    """Attention sees sinks and window exactly and the middle as the quantizer rebuilds it."""
    cache = RotatedQuantizedCache(llama.config, 3, seed=0, residual_length=8, num_sink_tokens=2)
    keys = torch.randn(1, 2, 40, 16, generator=_generator(9))
    values = torch.randn(1, 2, 40, 16, generator=_generator(10))
    cache.update(keys[:, :, :32], values[:, :, :32], 0)
    got_keys, got_values = cache.update(keys[:, :, 32:], values[:, :, 32:], 0)  # flushes 32 - 8 tokens
    layer = cache.layers[0]
    assert (layer.num_sinks, layer.num_compressed, layer.num_window) == (2, 22, 16)
    assert torch.equal(got_keys[:, :, :2], keys[:, :, :2]) and torch.equal(got_keys[:, :, 24:], keys[:, :, 24:])
    quantizer = layer.quantizers["value"]
    expected = quantizer.dequantize(quantizer.quantize(values[:, :, 2:24]))
    assert torch.equal(got_values[:, :, 2:24], expected)
    assert not torch.equal(got_values[:, :, 2:24], values[:, :, 2:24])


def test_rotation_seeds_draw_different_rotations(llama):
    first = RotatedQuantizedCache(llama.config, 2, seed=0).layers
    again = RotatedQuantizedCache(llama.config, 2, seed=0).layers
    other = RotatedQuantizedCache(llama.config, 2, seed=1).layers
    assert torch.equal(first[1].quantizers["key"].rotation, again[1].quantizers["key"].rotation)
    assert not torch.equal(first[1].quantizers["key"].rotation, other[1].quantizers["key"].rotation)
    assert not torch.equal(first[0].quantizers["key"].rotation, first[1].quantizers["key"].rotation)


def test_kivi_cache_generates_and_stores_what_its_format_says(llama):
    cache = KiviCache(llama.config, 2, group=8, residual_length=8, num_sink_tokens=2)
    out = llama.generate(_ids(30), **cache_kwargs(llama, cache), max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 42)
    counted = cache_bytes(cache)
    # 41 cached tokens: 2 sinks, 24 compressed (3 whole groups of 8), 15 dense in the window
    for layer in cache.layers:
        assert (layer.num_sinks, layer.num_compressed, layer.num_window) == (2, 24, 15)
    layers, heads, d = llama.config.num_hidden_layers, llama.config.num_key_value_heads, 16
    codes = 24 * d * 2 // 8  # 2-bit codes of one head, per kind
    keys = codes + (24 // 8) * d * 2 * 2  # + float16 scale and zero per channel of each token group
    values = codes + 24 * (d // 8) * 2 * 2  # + float16 scale and zero per channel group of each token
    assert counted["codes"] == layers * heads * (keys + values)
    assert counted["bits_per_element"] == pytest.approx(2 + 32 / 8)
    assert counted["dictionary"] == 0


def test_baseline_caches_follow_the_dense_model_closely_at_high_rates(llama):
    """At 6-7 bits per element the logits stay close to DynamicCache's; at 1 bit they do not."""
    from transformers import DynamicCache

    ids = _ids(48, seed=3)
    logits = {}
    for name, cache in {
        "dense": DynamicCache(config=llama.config),
        "rotated 6": RotatedQuantizedCache(llama.config, 6, residual_length=4, num_sink_tokens=1),
        "rotated 1": RotatedQuantizedCache(llama.config, 1, residual_length=4, num_sink_tokens=1),
        "kivi 8": KiviCache(llama.config, 8, group=8, residual_length=4, num_sink_tokens=1),
    }.items():
        feed(llama, ids, cache, prefill=24, chunk=8)
        logits[name] = llama(_ids(4, seed=4), **cache_kwargs(llama, cache)).logits
    dense = logits.pop("dense")
    errors = {name: (value - dense).abs().max().item() for name, value in logits.items()}
    assert errors["rotated 6"] < 0.01 and errors["kivi 8"] < 0.01
    assert errors["rotated 1"] > 5 * errors["rotated 6"]
