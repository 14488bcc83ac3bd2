"""Values by rotation and scalar quantization (``SparseSemanticCache(value_bits=b)``, rotated_values.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import VOCAB, make_dictionary, tiny_model
from sta_cache import SparseSemanticCache
from sta_cache.compat import cache_kwargs
from sta_cache.kernels.reference import LEVEL_SCALE_DTYPE
from sta_cache.lloyd_max import codebook_cells
from sta_cache.packing import level_row_bytes, unpack_level_rows
from sta_cache.rotated_values import RotatedValueCoder, layer_rotation

# Lloyd-Max distortion of a unit Gaussian (Max 1960): a rotated coordinate of a d = 64 vector is nearly Gaussian.
GAUSSIAN_DISTORTION = {2: 0.1175, 3: 0.03454, 4: 0.009497}
CPU = torch.device("cpu")


def decode(coder: RotatedValueCoder, rows: torch.Tensor) -> torch.Tensor:
    d = coder.rotation.shape[0]
    return unpack_level_rows(rows, d, coder.codebook) @ coder.rotation


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rotated_values_have_the_lloyd_max_distortion(bits):
    """Vectors of any direction and scale come back with the relative squared error of the Lloyd-Max quantizer at
    b bits (within the float8 gain's rounding), in rows of 1 + ceil(d b / 8) bytes."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4000, 64, generator=g) * torch.linspace(0.1, 3.0, 64)  # anisotropic: the rotation spreads it
    x *= torch.rand(4000, 1, generator=g) * 20
    coder = RotatedValueCoder(64, bits, layer_idx=0, device=CPU)
    rows, clamped = coder.encode(x)
    assert rows.dtype == torch.uint8 and rows.shape == (4000, level_row_bytes(64, bits)) and not clamped
    error = ((decode(coder, rows) - x).square().sum(-1) / x.square().sum(-1)).mean().item()
    assert GAUSSIAN_DISTORTION[bits] * 0.85 < error < GAUSSIAN_DISTORTION[bits] * 1.15


def test_the_gain_is_the_least_squares_scale_to_the_nearest_float8():
    """The stored gain is the float8 nearest to the least-squares scale of the codebook values onto the rotated
    vector (no better single float8 exists by more than rounding), not the vector's norm."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 64, generator=g) * 3
    coder = RotatedValueCoder(64, 3, layer_idx=2, device=CPU)
    rows, _ = coder.encode(x)
    values = unpack_level_rows(rows, 64, coder.codebook)
    stored_gain = rows[:, :1].contiguous().view(LEVEL_SCALE_DTYPE).float()
    quantized = values / stored_gain
    rotated = x @ coder.rotation.T
    best = (rotated * quantized).sum(-1, keepdim=True) / quantized.square().sum(-1, keepdim=True)
    assert torch.equal(stored_gain, best.to(LEVEL_SCALE_DTYPE).float())
    assert not torch.allclose(best, x.norm(dim=-1, keepdim=True), rtol=0.01)


def test_gains_beyond_float8_clamp_and_say_so():
    coder = RotatedValueCoder(16, 3, layer_idx=0, device=CPU)
    rows, clamped = coder.encode(torch.full((2, 16), 1e4))
    assert clamped and torch.isfinite(unpack_level_rows(rows, 16, coder.codebook)).all()
    assert not coder.encode(torch.zeros(2, 16))[1]


def test_layer_rotations_are_orthogonal_fixed_and_per_layer():
    first, again, other = layer_rotation(64, 3), layer_rotation(64, 3), layer_rotation(64, 4)
    assert torch.allclose(first @ first.T, torch.eye(64), atol=1e-5)
    assert torch.equal(first, again) and not torch.allclose(first, other)


def test_cache_with_rotated_values_stores_their_rows_and_rebuilds_them():
    """value_bits=b: each compressed value is one row of 1 + ceil(d b / 8) bytes and no index (memory_footprint
    counts exactly that), the dense path rebuilds values from the rows (bias + rotated codes), a value equal to
    the dictionary's bias comes back exactly, and more bits give logits closer to a DynamicCache's."""
    model = tiny_model("llama", "sta")
    dictionary = make_dictionary(model, encoder="omp")
    ids = torch.randint(1, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dynamic = DynamicCache(config=model.config)
        model(ids, **cache_kwargs(model, dynamic))
        exact = model(ids[:, :1], **cache_kwargs(model, dynamic)).logits
    logits, code_bytes = {}, {}
    for bits in (None, 8, 2):
        cache = SparseSemanticCache(
            dictionary, residual_length=4, config=model.config, value_bits=bits, k_key=4, k_value=None if bits else 4
        )
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
            logits[bits] = model(ids[:, :1], **cache_kwargs(model, cache)).logits
        code_bytes[bits] = cache.memory_footprint()["code_bytes"]
    layer = cache.sparse_layers[0]
    d = layer.head_dim
    indices, rows = layer.codes["value"]
    assert indices.shape[-1] == 0 and rows.dtype == torch.uint8 and rows.shape[-1] == level_row_bytes(d, 2)
    vectors = sum(layer.num_compressed for layer in cache.sparse_layers) * 2  # batch 1, 2 KV heads
    index_bytes = 4 * layer.stored_index_dtype.itemsize
    assert code_bytes[None] - code_bytes[2] == vectors * (index_bytes + 4 * 4 - level_row_bytes(d, 2))
    error = {bits: ((exact - logits[bits]).norm() / exact.norm()).item() for bits in (8, 2)}
    assert error[8] < error[2] / 5 < 0.1
    bias = layer.sae["value"]["b_dec"]
    rows, _ = layer.value_coder.encode(torch.zeros(1, 2, 1, d))
    layer.codes["value"] = (layer.codes["value"][0][:, :, :1], rows)
    layer.codes["key"] = tuple(t[:, :, :1] for t in layer.codes["key"])
    layer.key_positions = layer.key_positions[:, :1] if layer.key_positions is not None else None
    values = layer.dense_keys_values()[1][:, :, layer.num_sinks]
    assert torch.allclose(values, bias.expand(1, 2, d).to(values.dtype), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_cells_by_comparison_are_bucketize_cells(bits):
    """Up to 4 bits the cells are counted thresholds below each coordinate; they must be torch.bucketize's."""
    coder = RotatedValueCoder(64, bits, layer_idx=0, device=CPU)
    unit = torch.randn(300, 64, generator=torch.Generator().manual_seed(bits)) / 8
    unit[0, : len(coder.thresholds)] = coder.thresholds  # exactly on a threshold: the lower cell
    assert torch.equal(codebook_cells(unit, coder.thresholds).long(), torch.bucketize(unit, coder.thresholds))


def test_a_cache_larger_than_dense_names_its_value_storage():
    model = tiny_model("llama", "sta")
    dictionary = make_dictionary(model, encoder="omp")
    cache = SparseSemanticCache(dictionary, config=model.config, value_bits=8, k_key=dictionary.config.n_atoms)
    with pytest.warns(UserWarning, match=r"k_key=\d+, values rotated at 8 bits and float32 coefficients stores"):
        with torch.no_grad():
            model(torch.randint(1, VOCAB, (1, 8)), **cache_kwargs(model, cache))
