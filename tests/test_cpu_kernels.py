"""The fused C kernels of the "cpu" backend (kernels/cpu_kernels.c) against the PyTorch reference.

Queries are float32 so that the comparison is not hidden by rounding the output to a 16-bit dtype; the cache's
storage keeps each case's dtype. The kernels are built here with the system C compiler, as users' machines do.
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import ATTENTION_CASES, F32, TOL, gen, make_cache, make_mask, randn, rel_err
from sta_cache.kernels import cpu_kernels, dispatch, reference
from sta_cache.kernels.reference import LEVEL_SCALE_DTYPE
from sta_cache.packing import (
    index_bits,
    pack_indices,
    pack_level_rows,
    pack_levels,
    uniform_levels,
    unpack_level_rows,
    unpack_levels,
)
from sta_cache.rotated_values import RotatedValueCoder


def compare(kv: reference.CompressedKV, reference_kv: reference.CompressedKV, query, mask, softcap=None) -> float:
    d = query.shape[-1]
    out = cpu_kernels.sparse_attention(query, kv, mask, d**-0.5, softcap)
    ref = reference.sparse_attention_reference(query, reference_kv, mask, d**-0.5, softcap)
    assert out.shape == query.shape and out.dtype == query.dtype
    return rel_err(out, ref)


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_cpu_sparse_attention(case: str) -> None:
    b, hkv, groups, lq, d, s, c, w, n, k_key, k_value, hd, dtype, pre_rope, mask_kind, softcap, _ = ATTENTION_CASES[
        case
    ]
    g = gen(sum(map(ord, case)) + 1)
    kv = make_cache(g, b, hkv, d, s, c, w, n, k_key, k_value, hd, dtype, pre_rope)
    query = randn(g, b, hkv * groups, lq, d)
    mask = make_mask(mask_kind, b, lq, kv.length)
    assert compare(kv, kv, query, mask, softcap) < TOL[F32]


@pytest.mark.parametrize("n", [256, 300, 1000, 16384])
@pytest.mark.parametrize("coefficient_dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.int64])
@pytest.mark.parametrize("pre_rope", [False, True])
def test_cpu_kernels_read_packed_indices_and_narrow_coefficients(n, coefficient_dtype, pre_rope) -> None:
    """Bit-packed indices (8, 9, 10 and 14 bits) and one-byte float coefficients are widened inside the kernels;
    ``int64`` here stands for unpacked int64 indices with float32 coefficients."""
    g = gen(n + pre_rope)
    kv = make_cache(g, 2, 3, 64, 2, 333, 7, n, 8, 16, 1, F32, pre_rope)
    if coefficient_dtype == torch.int64:
        stored = kv.__class__(
            **{**vars(kv), "key_indices": kv.key_indices.long(), "value_indices": kv.value_indices.long()}
        )
    else:
        key_coefficients = kv.key_coefficients.to(coefficient_dtype)
        value_coefficients = kv.value_coefficients.to(coefficient_dtype)
        kv = kv.__class__(
            **{**vars(kv), "key_coefficients": key_coefficients, "value_coefficients": value_coefficients}
        )
        stored = kv.__class__(
            **{
                **vars(kv),
                "key_indices": pack_indices(kv.key_indices, n),
                "value_indices": pack_indices(kv.value_indices, n),
                "packed_index_bits": index_bits(n),
            }
        )
    query = randn(g, 2, 6, 1, 64)
    assert compare(stored, kv, query, make_mask("left", 2, 1, kv.length)) < TOL[F32]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("k_key, k_value", [(8, 16), (7, 5), (1, 3)])
@pytest.mark.parametrize("packed_indices", [False, True])
def test_cpu_kernels_read_coefficient_levels(bits, k_key, k_value, packed_indices) -> None:
    """Coefficients as b-bit levels on a float8 scale per vector (packing.pack_levels; rows of 1 + ceil(k b / 8)
    bytes, levels crossing byte boundaries for odd k and b) are widened inside the kernels: the output is the
    reference's over the same levels unpacked in PyTorch, pre- and post-RoPE."""
    for pre_rope in (False, True):
        g = gen(bits * 100 + k_key * 10 + k_value + packed_indices + 2 * pre_rope)
        kv = make_cache(g, 2, 3, 64, 2, 141, 7, 1000, k_key, k_value, 1, F32, pre_rope)
        rows = {kind: pack_levels(getattr(kv, f"{kind}_coefficients") * 3, bits) for kind in ("key", "value")}
        unpacked = kv.__class__(
            **{
                **vars(kv),
                "key_coefficients": unpack_levels(rows["key"], k_key, bits),
                "value_coefficients": unpack_levels(rows["value"], k_value, bits),
            }
        )
        stored = kv.__class__(
            **{
                **vars(kv),
                "key_coefficients": rows["key"],
                "value_coefficients": rows["value"],
                "key_levels": uniform_levels(bits),
                "value_levels": uniform_levels(bits),
                "k_key": k_key,
                "k_value": k_value,
            }
        )
        if packed_indices:
            stored.key_indices, stored.value_indices = (
                pack_indices(t, 1000) for t in (kv.key_indices, kv.value_indices)
            )
            stored.packed_index_bits = index_bits(1000)
        query = randn(g, 2, 6, 1, 64)
        assert compare(stored, unpacked, query, make_mask("left", 2, 1, kv.length)) < TOL[F32]
        with pytest.raises(ValueError, match="only the 'cpu' backend reads bit-packed indices and coefficient levels"):
            dispatch.sparse_attention(query, stored, None, 0.125, None, "torch")


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("d, hd", [(64, 1), (96, 3)])
@pytest.mark.parametrize("c", [141, 3000])
def test_cpu_kernels_read_rotated_values(bits, d, hd, c) -> None:
    """Values of the rotated coder (rotated_values.py): no indices stored (slot j is atom j, the atoms a
    rotation), level rows of a float8 gain and Lloyd-Max codes. The kernels read them as stored; the reference reads
    explicit indices 0..d-1 and the unpacked coefficients. Long contexts split the value pass over threads; keys
    stay packed atom codes with 6-bit levels, so the two kinds read different level tables."""
    for pre_rope in (False, True):
        g = gen(bits * 1000 + d + hd + c + pre_rope)
        kv = make_cache(g, 2, 3, d, 2, c, 7, 300, 8, 16, hd, F32, pre_rope)
        coder = RotatedValueCoder(d, bits, layer_idx=bits, device=torch.device("cpu"))
        rows, clamped = coder.encode(randn(g, 2, 3, c, d))
        assert not clamped and rows.shape == (2, 3, c, 1 + (d * bits + 7) // 8)
        key_rows = pack_levels(kv.key_coefficients, 6)
        unpacked = kv.__class__(
            **{
                **vars(kv),
                "key_coefficients": unpack_levels(key_rows, 8, 6),
                "value_indices": torch.arange(d).expand(2, 3, c, d),
                "value_coefficients": unpack_level_rows(rows, d, coder.codebook),
                "value_atoms": coder.rotation.expand(hd, d, d),
            }
        )
        stored = kv.__class__(
            **{
                **vars(unpacked),
                "key_indices": pack_indices(kv.key_indices, 300),
                "key_coefficients": key_rows,
                "value_indices": torch.zeros(2, 3, c, 0, dtype=torch.uint8),
                "value_coefficients": rows,
                "packed_index_bits": index_bits(300),
                "key_levels": uniform_levels(6),
                "value_levels": coder.codebook,
                "k_key": 8,
                "k_value": d,
            }
        )
        query = randn(g, 2, 6, 1, d)
        assert compare(stored, unpacked, query, make_mask("left", 2, 1, kv.length)) < TOL[F32]
    implicit_keys = stored.__class__(**{**vars(stored), "key_indices": torch.zeros(2, 3, c, 0, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="keys with no stored indices"):
        cpu_kernels.sparse_attention(query, implicit_keys, None, d**-0.5)
    too_few_atoms = stored.__class__(**{**vars(stored), "value_atoms": coder.rotation[None, : d // 2]})
    with pytest.raises(ValueError, match=f"{d} coefficients per value need {d} atoms, the value dictionary has"):
        cpu_kernels.sparse_attention(query, too_few_atoms, None, d**-0.5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("pre_rope", [False, True])
def test_cpu_kernels_split_long_contexts_over_threads(threads, pre_rope) -> None:
    """Past 4 blocks of tokens the value kernel gives each thread a private accumulator; the sum must not
    depend on the thread count (3 threads on 2 cores also checks an uneven split)."""
    g = gen(threads)
    kv = make_cache(g, 1, 3, 64, 4, 5000, 64, 1024, 8, 16, 1, F32, pre_rope)
    query = randn(g, 1, 9, 1, 64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert compare(kv, kv, query, None) < TOL[F32]
    finally:
        torch.set_num_threads(previous)


def test_cpu_kernels_take_negative_rope_positions() -> None:
    """Left-padded rows can carry negative position ids; their angles come from a directly computed table."""
    g = gen(11)
    kv = make_cache(g, 2, 1, 64, 0, 50, 3, 256, 8, 16, 1, F32, True)
    kv.key_positions = (torch.arange(50, dtype=torch.int32) - 20).expand(2, 50).contiguous()
    query = randn(g, 2, 2, 1, 64)
    assert compare(kv, kv, query, None) < TOL[F32]


def test_dispatcher_routes_to_cpu_kernels_and_guards_packed_indices() -> None:
    g = gen(5)
    kv = make_cache(g, 1, 2, 64, 2, 40, 5, 1000, 4, 8, 1, F32, False)
    query = randn(g, 1, 4, 1, 64)
    want = dispatch.sparse_attention(query, kv, None, 0.125, None, "torch")
    assert rel_err(dispatch.sparse_attention(query, kv, None, 0.125, None, "cpu"), want) < TOL[F32]
    packed = kv.__class__(
        **{
            **vars(kv),
            "key_indices": pack_indices(kv.key_indices, 1000),
            "packed_index_bits": 10,
            "value_indices": pack_indices(kv.value_indices, 1000),
        }
    )
    assert rel_err(dispatch.sparse_attention(query, packed, None, 0.125, None, "cpu"), want) < TOL[F32]
    with pytest.raises(ValueError, match="only the 'cpu' backend reads bit-packed indices"):
        dispatch.sparse_attention(query, packed, None, 0.125, None, "torch")
    assert dispatch.resolve_backend("cpu", torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        dispatch.resolve_backend("cpu", torch.device("cuda"))


def test_a_missing_or_failing_compiler_is_reported(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("STA_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    cpu_kernels.reset()
    try:
        with pytest.raises(cpu_kernels.CPUKernelUnavailable, match="no C compiler found"):
            cpu_kernels.library()
        monkeypatch.undo()
        monkeypatch.setenv("STA_CACHE_HOME", str(tmp_path))
        monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
        cpu_kernels.reset()  # the failure above is kept for the process
        with pytest.raises(cpu_kernels.CPUKernelUnavailable, match="failed"):
            cpu_kernels.library()
        assert not list((tmp_path / "kernels").glob("*.so")), "a failed build must not leave a library behind"
    finally:
        cpu_kernels.reset()


def test_auto_backend_takes_the_cpu_kernels_where_they_fit(monkeypatch, tmp_path) -> None:
    cpu = torch.device("cpu")
    assert dispatch.resolve_backend("auto", cpu, head_dim=64) == "cpu"
    assert dispatch.resolve_backend("auto", cpu, head_dim=24) == "torch"  # not a multiple of 16
    with pytest.raises(ValueError, match="multiple of 16"):
        dispatch.resolve_backend("cpu", cpu, head_dim=24)
    monkeypatch.setenv("STA_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    cpu_kernels.reset()
    try:
        with pytest.warns(RuntimeWarning, match="fused CPU kernels are unavailable"):
            assert dispatch.resolve_backend("auto", cpu, head_dim=64) == "torch"
    finally:
        cpu_kernels.reset()


def test_kernels_build_without_openmp(monkeypatch, tmp_path) -> None:
    """A compiler without OpenMP (Apple clang) still builds the kernels, single-threaded, with the same results."""
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text('#!/bin/sh\nfor arg in "$@"; do [ "$arg" = -fopenmp ] && exit 1; done\nexec gcc "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("STA_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(compiler))
    cpu_kernels.reset()
    try:
        g = gen(3)
        kv = make_cache(g, 1, 3, 64, 4, 2000, 16, 1024, 8, 16, 1, F32, True)
        assert compare(kv, kv, randn(g, 1, 9, 1, 64), None) < TOL[F32]
        assert len(list((tmp_path / "kernels").glob("*.so"))) == 1
    finally:
        cpu_kernels.reset()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_cpu_rotated_levels_are_the_pytorch_cells_and_gains(bits) -> None:
    """The C pass over rotated values gives PyTorch's cells bit for bit (coordinates exactly on a threshold, zero
    vectors and non-unit norms included), packed as ``pack_level_rows`` packs them, and the float64 least-squares
    gains to float32 rounding."""
    coder = RotatedValueCoder(64, bits, layer_idx=1, device=torch.device("cpu"))
    g = gen(bits)
    rotated = torch.randn(257, 64, generator=g) * torch.rand(257, 1, generator=g) * 40
    rotated[0] = 0
    norms = rotated.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    on = coder.thresholds[:64]
    norms[1], rotated[1, : len(on)] = 2.0, 2.0 * on  # exactly on a threshold after the division: the lower cell
    rows, gains = cpu_kernels.rotated_levels(rotated, norms, coder.thresholds, coder.codebook, bits)
    cells = torch.bucketize(rotated / norms[:, None], coder.thresholds)
    expected = pack_level_rows(torch.zeros(257, 1, dtype=LEVEL_SCALE_DTYPE), cells, bits)
    assert rows.shape == expected.shape and torch.equal(rows, expected)
    q = coder.codebook.double()[cells]
    exact = (rotated.double() * q).sum(-1) / q.square().sum(-1)
    assert torch.allclose(gains.double(), exact, rtol=1e-5, atol=1e-6) and gains[0] == 0


@pytest.mark.parametrize("bits", [2, 3])
def test_rotated_values_code_alike_on_the_cpu_backend_and_in_pytorch(bits) -> None:
    """``RotatedValueCoder.encode`` through the C pass stores the rows of the PyTorch reference: the same packed
    cells, and the same float8 gain but where the float32 gain lies within rounding of a float8 midpoint."""
    coder = RotatedValueCoder(64, bits, layer_idx=4, device=torch.device("cpu"))
    g = gen(10 + bits)
    centred = torch.randn(2, 3, 500, 64, generator=g) * torch.linspace(0.2, 4.0, 64) * 5
    reference_rows, reference_clamped = coder.encode(centred)
    rows, clamped = coder.encode(centred, "cpu")
    assert rows.shape == reference_rows.shape and clamped == reference_clamped is False
    assert torch.equal(rows[..., 1:], reference_rows[..., 1:])
    scales = [r[..., :1].contiguous().view(LEVEL_SCALE_DTYPE).float() for r in (rows, reference_rows)]
    assert (rows[..., 0] == reference_rows[..., 0]).float().mean() > 0.999
    assert torch.allclose(scales[0], scales[1], rtol=0.07)  # at most one float8 step apart
