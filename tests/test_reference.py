"""The PyTorch path's fast formulations (sparse code matrices, the shared RoPE table) against naive float64 math."""

from __future__ import annotations

import pytest
import torch

from sta_cache.kernels import reference
from sta_cache.kernels.reference import omp_encode_reference


def naive_decode(indices, coefficients, atoms, bias):
    """Gather every atom and sum, in float64: ``[B, H, C, k]`` codes over ``atoms [Hd, N, d]``."""
    heads = indices.shape[1]
    per_head = atoms if atoms.shape[0] == heads else atoms.expand(heads, -1, -1)
    gathered = torch.stack([per_head[h].double()[indices[:, h].long()] for h in range(heads)], dim=1)
    out = (coefficients.double().unsqueeze(-1) * gathered).sum(-2)
    return out + bias.double().view(1, -1, 1, atoms.shape[-1])


def naive_rope(x, positions, inv_freq, sign):
    """Rotate-half RoPE written out pair by pair in float64."""
    half = x.shape[-1] // 2
    angle = sign * positions.double()[..., None] * inv_freq.double()  # [B, C, d/2]
    cos, sin = angle.cos().unsqueeze(1), angle.sin().unsqueeze(1)
    first, second = x.double()[..., :half], x.double()[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


@pytest.mark.parametrize("batch,heads,dictionary_heads,tokens,k", [(1, 3, 1, 50, 8), (2, 4, 4, 17, 5), (3, 2, 1, 1, 1)])
def test_decode_matches_gathering_every_atom(batch, heads, dictionary_heads, tokens, k):
    g = torch.Generator().manual_seed(tokens * k)
    n, d = 40, 16
    indices = torch.randint(0, n, (batch, heads, tokens, k), generator=g)
    indices[..., -1] = indices[..., 0]  # a repeated atom in a row must count twice
    coefficients = torch.randn(batch, heads, tokens, k, generator=g)
    atoms, bias = torch.randn(dictionary_heads, n, d, generator=g), torch.randn(dictionary_heads, d, generator=g)
    out = reference.decode_reference(indices.to(torch.int16), coefficients, atoms, bias)
    expected = naive_decode(indices, coefficients, atoms, bias)
    assert out.dtype == torch.float32 and out.shape == (batch, heads, tokens, d)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_decode_of_no_tokens_is_empty():
    out = reference.decode_reference(
        torch.zeros(2, 3, 0, 4, dtype=torch.long), torch.zeros(2, 3, 0, 4), torch.randn(1, 10, 8), torch.randn(1, 8)
    )
    assert out.shape == (2, 3, 0, 8)


def test_post_rope_scores_match_rebuilt_keys():
    """Post-RoPE key scores from the sparse code matrix times ``q . D^T`` equal ``q`` dotted with rebuilt keys."""
    g = torch.Generator().manual_seed(3)
    b, h, groups, c, k, n, d = 2, 3, 2, 30, 6, 64, 16
    indices = torch.randint(0, n, (b, h, c, k), generator=g)
    coefficients = torch.randn(b, h, c, k, generator=g)
    atoms, bias = torch.randn(1, n, d, generator=g), torch.randn(1, d, generator=g)
    empty = torch.zeros(b, h, 0, d)
    kv = reference.CompressedKV(
        empty, empty, indices, coefficients, indices, coefficients, empty, empty, atoms, bias, atoms, bias
    )
    q = torch.randn(b, h, groups, d, generator=g)
    scores = reference._compressed_key_scores(q, kv)
    expected = q.double() @ naive_decode(indices, coefficients, atoms, bias).transpose(-1, -2)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-4)


def test_rope_table_equals_direct_evaluation_bit_for_bit():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    positions = torch.tensor([[0, 1, 7, 4095], [9000, 12, 3, 2]])  # 9000 grows the table past its first size
    cos, sin = reference.rope_cos_sin(positions, inv_freq)
    angle = positions[..., None].float() * inv_freq
    assert torch.equal(cos, angle.cos()) and torch.equal(sin, angle.sin())
    negative = torch.tensor([[-3, 5]])  # not in the table: evaluated directly
    cos, _ = reference.rope_cos_sin(negative, inv_freq)
    assert torch.equal(cos, (negative[..., None].float() * inv_freq).cos())


def test_apply_and_undo_rope_match_naive_rotation():
    g = torch.Generator().manual_seed(5)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    x = torch.randn(2, 3, 11, 16, generator=g)
    positions = torch.randint(0, 5000, (2, 11), generator=g)
    rotated = reference.apply_rope(x, positions, inv_freq, scaling=1.5)
    torch.testing.assert_close(rotated.double(), 1.5 * naive_rope(x, positions, inv_freq, 1.0), rtol=1e-4, atol=1e-4)
    back = reference.undo_rope(rotated, positions, inv_freq, scaling=1.5)
    torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_table_read_equals_the_cast(dtype):
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).view(4, 64)
    torch.testing.assert_close(reference.as_float32(every_byte), every_byte.float(), rtol=0, atol=0, equal_nan=True)


def test_matching_pursuit_equals_omp_on_orthonormal_atoms_and_not_on_coherent_ones() -> None:
    """With orthonormal atoms the matching-pursuit residual is the orthogonal one, so both pursuits give the same
    codes; with coherent atoms MP picks differently and fits no better (its coefficients are the same least
    squares, on picks made from a worse residual)."""
    g = torch.Generator().manual_seed(0)
    orthonormal = torch.linalg.qr(torch.randn(32, 32, generator=g))[0].T  # rows: an orthonormal basis
    x, bias = torch.randn(50, 32, generator=g), torch.zeros(32)
    omp, mp = (omp_encode_reference(x, orthonormal, bias, 8, pursuit=p) for p in ("omp", "mp"))
    assert torch.equal(omp[0], mp[0])
    torch.testing.assert_close(omp[1], mp[1])
    coherent = torch.nn.functional.normalize(
        torch.randn(256, 4, generator=g) @ torch.randn(4, 32, generator=g) + 0.3 * torch.randn(256, 32, generator=g),
        dim=-1,
    )
    (omp_i, omp_c), (mp_i, mp_c) = (omp_encode_reference(x, coherent, bias, 8, pursuit=p) for p in ("omp", "mp"))
    assert not torch.equal(omp_i, mp_i)
    error = [
        (x - (c.unsqueeze(-1) * coherent[i]).sum(1)).norm(dim=-1).mean() for i, c in ((omp_i, omp_c), (mp_i, mp_c))
    ]
    assert error[0] <= error[1]


def test_pursuit_must_be_known() -> None:
    with pytest.raises(ValueError, match="pursuit must be one of"):
        omp_encode_reference(torch.randn(2, 8), torch.eye(8), torch.zeros(8), 2, pursuit="greedy")
