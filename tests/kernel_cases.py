"""Random inputs shared by the kernel tests (Triton and C kernels against the PyTorch references).

Inputs are fresh random tensors, never zeros; tolerance is relative L2 error < 1e-4 in float32, < 1e-2 in float16 /
bfloat16 storage.
"""

from __future__ import annotations

import torch

from sta_cache.kernels import reference

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-4, F16: 1e-2, BF16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "kernel output has NaN/inf (unwritten or poisoned elements)"
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int, scale: float = 1.0, dtype: torch.dtype = F32) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def unit_atoms(g: torch.Generator, n: int, d: int, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)


def check_indices(indices: torch.Tensor, n: int) -> None:
    assert ((indices >= 0) & (indices < n)).all(), "index out of range (unwritten output?)"
    ordered = indices.sort(dim=-1).values
    assert (ordered[:, 1:] != ordered[:, :-1]).all(), "an atom was chosen twice"


def decode_rows(indices: torch.Tensor, coefficients: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """``[M, k]`` codes over ``atoms [N, d]`` -> ``[M, d]`` with the package's decoder (bias left out)."""
    m, k = indices.shape
    bias = torch.zeros(1, atoms.shape[1])
    return reference.decode_reference(indices.view(1, 1, m, k), coefficients.view(1, 1, m, k), atoms[None], bias)[0, 0]


def check_omp_codes(indices, coefficients, ref_indices, ref_coefficients, x, atoms, b_dec, tol: float) -> None:
    """OMP codes against the reference's. Greedy picks can differ from the reference only on near-ties, which happen
    once the residual is at noise level (k near d); so: same reconstruction while k <= d / 2, never a worse
    residual, and coefficients that are the least-squares fit on the kernel's own atoms."""
    k, (n, d) = indices.shape[1], atoms.shape
    check_indices(indices, n)
    target = (x.float() - b_dec.float()).double()
    atoms64 = atoms.double()
    recon = decode_rows(indices, coefficients, atoms.float())
    ref_recon = decode_rows(ref_indices, ref_coefficients, atoms.float())
    if 2 * k <= d:
        assert rel_err(recon, ref_recon) < tol
    residual = (target - recon.double()).norm(dim=-1)
    ref_residual = (target - ref_recon.double()).norm(dim=-1)
    assert (residual <= ref_residual + tol * target.norm(dim=-1)).all()
    lstsq = torch.linalg.lstsq(atoms64[indices].transpose(1, 2), target.unsqueeze(-1)).solution.squeeze(-1)
    assert rel_err(recon, decode_rows(indices, lstsq, atoms64)) < tol


# ----------------------------------------------------------------------------------------------------- attention


def make_cache(
    g: torch.Generator,
    b: int,
    hkv: int,
    d: int,
    s: int,
    c: int,
    w: int,
    n: int,
    k_key: int,
    k_value: int,
    hd: int,
    dtype: torch.dtype,
    pre_rope: bool,
) -> reference.CompressedKV:
    index_dtype = torch.uint8 if n <= 256 else torch.int16 if n <= 2**15 else torch.int32

    def codes(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.rand(b * hkv * c, n, generator=g)
        indices = scores.topk(k, dim=-1).indices.view(b, hkv, c, k)  # distinct atoms per token
        return indices.to(index_dtype), randn(g, b, hkv, c, k, scale=k**-0.5, dtype=dtype)

    key_indices, key_coefficients = codes(k_key)
    value_indices, value_coefficients = codes(k_value)
    positions = inv_freq = None
    if pre_rope:
        positions = (torch.randperm(40_000, generator=g)[:c].sort().values + 7).to(torch.int32).expand(b, c)
        inv_freq = 1.0 / (10_000 ** (torch.arange(0, d, 2).float() / d))
    return reference.CompressedKV(
        sink_keys=randn(g, b, hkv, s, d, dtype=dtype),
        sink_values=randn(g, b, hkv, s, d, dtype=dtype),
        key_indices=key_indices,
        key_coefficients=key_coefficients,
        value_indices=value_indices,
        value_coefficients=value_coefficients,
        window_keys=randn(g, b, hkv, w, d, dtype=dtype),
        window_values=randn(g, b, hkv, w, d, dtype=dtype),
        key_atoms=randn(g, hd, n, d, scale=0.3, dtype=dtype),
        key_bias=randn(g, hd, d, scale=0.1, dtype=dtype),
        value_atoms=randn(g, hd, n, d, scale=0.3, dtype=dtype),
        value_bias=randn(g, hd, d, scale=0.1, dtype=dtype),
        key_positions=positions,
        rope_inv_freq=inv_freq,
        rope_scaling=1.25 if pre_rope else 1.0,
    )


def make_mask(kind: str | None, b: int, lq: int, length: int) -> torch.Tensor | None:
    """``left``: left padding (rows > 0 lose their first slots); ``empty``: also one query row sees nothing;
    ``causal``: ``lq`` new tokens at the end of the window that each see only the past."""
    if kind is None:
        return None
    mask = torch.ones(b, lq, length, dtype=torch.bool)
    for row in range(1, b):
        mask[row, :, : 3 * row + 1] = False
    if kind == "empty":
        mask[-1, lq - 1] = False
    if kind == "causal":
        for i in range(lq):
            mask[:, i, length - lq + i + 1 :] = False
    return mask


ATTENTION_CASES = {
    # name: (B, Hkv, G, Lq, d, sinks, codes, window, N, k_key, k_value, Hd, dtype, pre_rope, mask, softcap, chunk)
    "one-token-window": (1, 1, 1, 1, 64, 0, 0, 1, 256, 8, 16, 1, F32, False, None, None, None),
    "one-code-k1": (1, 2, 2, 1, 64, 0, 1, 0, 256, 1, 1, 1, F32, False, None, None, None),
    "gqa4-left-pad": (2, 2, 4, 1, 64, 3, 100, 20, 256, 8, 16, 1, F32, False, "left", None, 32),
    "gqa8-fp16-softcap": (2, 1, 8, 1, 128, 4, 300, 37, 4096, 8, 16, 1, F16, False, "left", 30.0, None),
    "pre-rope-bf16-empty-row": (2, 2, 2, 3, 128, 2, 150, 9, 1000, 16, 32, 2, BF16, True, "empty", None, 64),
    "pre-rope-d256-softcap": (2, 2, 1, 1, 256, 1, 77, 13, 512, 32, 64, 2, F32, True, None, 50.0, 32),
    "n16384": (1, 4, 2, 1, 64, 0, 200, 0, 16384, 4, 8, 1, F32, False, None, None, None),
    "k64-odd-n-fp16-empty-row": (3, 1, 4, 2, 128, 5, 90, 11, 300, 64, 64, 1, F16, False, "empty", None, 32),
    "pre-rope-gqa8-left-pad": (2, 1, 8, 1, 64, 4, 130, 8, 2048, 8, 16, 1, F32, True, "left", None, None),
    "gqa3-odd-k-bf16-per-head": (2, 2, 3, 1, 128, 2, 60, 5, 512, 12, 20, 2, BF16, False, "left", None, 32),
    "speculative-causal": (1, 2, 4, 4, 64, 2, 40, 30, 256, 8, 16, 1, F32, False, "causal", None, 32),
    "no-codes-fp16-d256": (2, 2, 2, 1, 256, 4, 0, 9, 256, 8, 16, 1, F16, False, "left", None, None),
    "prefill-falls-back": (1, 1, 4, 20, 64, 2, 50, 30, 256, 8, 16, 1, F32, False, "causal", None, None),
}
