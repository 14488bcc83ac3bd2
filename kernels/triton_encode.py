"""Triton encoders: Top-K SAE encode and orthogonal matching pursuit, drop-in for the references in ``reference.py``.

Both compute in float32 (``tl.dot`` with IEEE precision, never TF32) and return ``(indices int64 [M, k],
coefficients [M, k] in x's dtype)``. On CUDA they compile; on CPU they run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import PURSUITS
from .triton_launch import scratch, target_programs

_OMP_SCRATCH_BYTES = 128 << 20  # per-launch cap on OMP's per-row Q/R scratch; larger M is coded in row chunks


# ----------------------------------------------------------------------------------------------- running top-k


@triton.jit
def _insert_tile(run_v, run_i, tile_v, tile_i, cols_tile, cols_k):
    """Merge a candidate tile ``tile_v/tile_i [BM, BT]`` into the running top-k ``run_v/run_i [BM, KP]``.

    ``run_v``'s padding slots hold +inf so they are never the minimum. Each pass moves, for every row whose tile
    maximum beats its current k-th best, that maximum into the slot of the current minimum; it loops until no row
    has a candidate left above its threshold, so after the first tiles a tile usually costs one pass."""
    thresh = tl.min(run_v, 1)
    best = tl.max(tile_v, 1)
    while tl.max((best > thresh).to(tl.int32), 0) > 0:
        take = best > thresh
        at = tl.argmax(tile_v, 1)
        slot = tl.argmin(run_v, 1)
        hit = (cols_tile[None, :] == at[:, None]) & take[:, None]
        index = tl.sum(tl.where(hit, tile_i, 0), 1)
        put = (cols_k[None, :] == slot[:, None]) & take[:, None]
        run_v = tl.where(put, best[:, None], run_v)
        run_i = tl.where(put, index[:, None], run_i)
        tile_v = tl.where(hit, float("-inf"), tile_v)
        thresh = tl.min(run_v, 1)
        best = tl.max(tile_v, 1)
    return run_v, run_i


@triton.jit
def _store_sorted(run_v, run_i, cols_k, rows, row_ok, out_v_ptr, out_i_ptr, K: tl.constexpr):
    """Store the running top-k in descending order (as ``torch.topk``), ReLU applied, to ``[M, K]`` outputs."""
    run_v = tl.where(cols_k[None, :] < K, run_v, float("-inf"))
    sorted_v = tl.zeros_like(run_v)
    sorted_i = tl.zeros_like(run_i)
    for j in range(K):
        at = tl.argmax(run_v, 1)
        hit = cols_k[None, :] == at[:, None]
        here = cols_k[None, :] == j
        sorted_v = tl.where(here, tl.max(run_v, 1)[:, None], sorted_v)
        sorted_i = tl.where(here, tl.sum(tl.where(hit, run_i, 0), 1)[:, None], sorted_i)
        run_v = tl.where(hit, float("-inf"), run_v)
    offsets = rows[:, None] * K + cols_k[None, :]
    ok = row_ok[:, None] & (cols_k[None, :] < K)
    tl.store(out_v_ptr + offsets, tl.maximum(sorted_v, 0.0).to(out_v_ptr.dtype.element_ty), mask=ok)
    tl.store(out_i_ptr + offsets, sorted_i.to(tl.int64), mask=ok)


@triton.jit
def _topk_kernel(
    x_ptr,
    sx_m,
    w_ptr,
    sw_d,
    sw_n,
    b_enc_ptr,
    b_dec_ptr,
    out_v_ptr,
    out_i_ptr,
    cand_v_ptr,
    cand_i_ptr,
    M,
    N,
    D,
    atoms_per_split,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FINAL: tl.constexpr,
):
    """One program: ``BLOCK_M`` rows x one split of the atoms. Pre-activations live only in registers, one
    ``[BLOCK_M, BLOCK_N]`` tile at a time. With one split it writes the sorted codes; otherwise its ``KP``
    candidates per row go to ``cand_*[M, splits * KP]`` for :func:`_topk_merge_kernel`."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dims = tl.arange(0, BLOCK_D)
    x = tl.load(
        x_ptr + rows[:, None].to(tl.int64) * sx_m + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D), other=0.0
    ).to(tl.float32)
    x = x - tl.load(b_dec_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)[None, :]
    x = tl.where(dims[None, :] < D, x, 0.0)
    cols_k = tl.arange(0, KP)
    cols_n = tl.arange(0, BLOCK_N)
    run_v = tl.where(cols_k[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KP], tl.float32)
    run_i = tl.zeros([BLOCK_M, KP], tl.int32)
    start = split * atoms_per_split
    stop = tl.minimum(start + atoms_per_split, N)
    for n0 in range(start, stop, BLOCK_N):
        atoms = n0 + cols_n
        w = tl.load(
            w_ptr + dims[:, None] * sw_d + atoms[None, :].to(tl.int64) * sw_n,
            mask=(dims[:, None] < D) & (atoms[None, :] < stop),
            other=0.0,
        ).to(tl.float32)
        pre = tl.dot(x, w, input_precision="ieee")
        pre += tl.load(b_enc_ptr + atoms, mask=atoms < stop, other=0.0).to(tl.float32)[None, :]
        pre = tl.where(row_ok[:, None] & (atoms[None, :] < stop), pre, float("-inf"))
        tile_i = atoms[None, :] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        run_v, run_i = _insert_tile(run_v, run_i, pre, tile_i, cols_n, cols_k)
    if FINAL:
        _store_sorted(run_v, run_i, cols_k, rows, row_ok, out_v_ptr, out_i_ptr, K)
    else:
        splits = tl.num_programs(1)
        offsets = rows[:, None].to(tl.int64) * (splits * KP) + split * KP + cols_k[None, :]
        tl.store(cand_v_ptr + offsets, tl.where(cols_k[None, :] < K, run_v, float("-inf")), mask=row_ok[:, None])
        tl.store(cand_i_ptr + offsets, run_i, mask=row_ok[:, None])


@triton.jit
def _topk_merge_kernel(
    cand_v_ptr,
    cand_i_ptr,
    out_v_ptr,
    out_i_ptr,
    M,
    width,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Top-k of each row's ``width`` split candidates -> sorted codes."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols_k = tl.arange(0, KP)
    cols_c = tl.arange(0, BLOCK_C)
    run_v = tl.where(cols_k[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KP], tl.float32)
    run_i = tl.zeros([BLOCK_M, KP], tl.int32)
    for c0 in range(0, width, BLOCK_C):
        ok = row_ok[:, None] & (c0 + cols_c[None, :] < width)
        offsets = rows[:, None].to(tl.int64) * width + c0 + cols_c[None, :]
        tile_v = tl.load(cand_v_ptr + offsets, mask=ok, other=float("-inf"))
        tile_i = tl.load(cand_i_ptr + offsets, mask=ok, other=0)
        run_v, run_i = _insert_tile(run_v, run_i, tile_v, tile_i, cols_c, cols_k)
    _store_sorted(run_v, run_i, cols_k, rows, row_ok, out_v_ptr, out_i_ptr, K)


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    *,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ReLU(TopK((x - b_dec) W_enc + b_enc))`` for ``x [M, d]``, ``W_enc [d, N]`` -> ``(int64 [M, k], [M, k])``,
    sorted by value like the reference.

    Atoms are streamed in ``BLOCK_N`` tiles with a running top-k per row, so the ``[M, N]`` pre-activations never
    reach global memory. When ``M`` is small (decode appends a handful of rows) the atoms are also split across
    programs (``num_splits``, default: enough to fill the GPU) and a second tiny kernel merges the split winners."""
    m, d = x.shape
    n = W_enc.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of atoms {n}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    kp = triton.next_power_of_2(k)
    block_m, block_d = 16, max(16, triton.next_power_of_2(d))
    block_n = 64 if block_d >= 256 else 128
    m_blocks = triton.cdiv(m, block_m)
    if num_splits is None:
        num_splits = max(1, min(target_programs(x.device, 1) // m_blocks, triton.cdiv(n, block_n)))
    per_split = triton.cdiv(triton.cdiv(n, num_splits), block_n) * block_n
    num_splits = triton.cdiv(n, per_split)
    values = torch.full((m, k), float("nan"), device=x.device, dtype=x.dtype)
    indices = torch.full((m, k), -1, device=x.device, dtype=torch.int64)
    final = num_splits == 1
    cand_v = cand_i = values
    if not final:
        cand_v = scratch((m, num_splits * kp), x.device)
        cand_i = scratch((m, num_splits * kp), x.device, torch.int32)
    _topk_kernel[(m_blocks, num_splits)](
        x,
        x.stride(0),
        W_enc,
        W_enc.stride(0),
        W_enc.stride(1),
        b_enc,
        b_dec,
        values,
        indices,
        cand_v,
        cand_i,
        m,
        n,
        d,
        per_split,
        K=k,
        KP=kp,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        FINAL=final,
    )
    if not final:
        _topk_merge_kernel[(m_blocks,)](
            cand_v,
            cand_i,
            values,
            indices,
            m,
            num_splits * kp,
            K=k,
            KP=kp,
            BLOCK_M=block_m,
            BLOCK_C=min(128, triton.next_power_of_2(num_splits * kp)),
        )
    return indices, values


# ------------------------------------------------------------------------------------- orthogonal matching pursuit


@triton.jit
def _omp_best_atom(
    residual,
    atoms_ptr,
    sa_n,
    chosen,
    N,
    D,
    dims,
    EXCLUDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KP: tl.constexpr,
):
    """Running arg-max over all atoms of ``|residual . atom|``, tiled over atoms. With ``EXCLUDE`` the atoms in
    ``chosen [BM, KP]`` are skipped (``KP`` compares per tile entry, so only run when the cheap pass picked one)."""
    cols_n = tl.arange(0, BLOCK_N)
    cols_k = tl.arange(0, KP)
    best_v = tl.full([BLOCK_M], -1.0, tl.float32)
    best_i = tl.zeros([BLOCK_M], tl.int32)
    for n0 in range(0, N, BLOCK_N):
        atoms = n0 + cols_n
        tile = tl.load(
            atoms_ptr + atoms[:, None].to(tl.int64) * sa_n + dims[None, :],
            mask=(atoms[:, None] < N) & (dims[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        corr = tl.abs(tl.dot(residual, tl.trans(tile), input_precision="ieee"))
        corr = tl.where(atoms[None, :] < N, corr, -1.0)
        if EXCLUDE:
            for j in range(KP):
                taken = tl.sum(tl.where(cols_k[None, :] == j, chosen, 0), 1)
                corr = tl.where(atoms[None, :] == taken[:, None], -1.0, corr)
        tile_v = tl.max(corr, 1)
        tile_i = n0 + tl.argmax(corr, 1)
        better = tile_v > best_v
        best_v = tl.where(better, tile_v, best_v)
        best_i = tl.where(better, tile_i, best_i)
    return best_i


@triton.jit
def _omp_kernel(
    x_ptr,
    sx_m,
    atoms_ptr,
    sa_n,
    b_dec_ptr,
    out_i_ptr,
    out_c_ptr,
    q_ptr,
    r_ptr,
    M,
    N,
    D,
    ridge,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MATCHING: tl.constexpr,
):
    """OMP for ``BLOCK_M`` rows (with ``MATCHING``, the picks read the matching-pursuit residual instead: each pick
    removes only itself times its correlation; the coefficients are the same least-squares fit). The least
    squares is a QR of the chosen atoms grown one column per step by modified Gram-Schmidt, applied twice ("twice
    is enough") and to the residual as an augmented column; the orthonormal ``Q [KP, d]`` and the triangular
    ``R [KP, KP]`` of each row live in a small scratch (L1/L2 resident), and the coefficients come from one
    back-substitution ``R c = Q^T target`` at the end.
    ``ridge`` is added to each new ``R_ss^2`` (the reference adds it to the Gram diagonal)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    cols_k = tl.arange(0, KP)
    dim_ok = dims[None, :] < D
    x = tl.load(x_ptr + rows64[:, None] * sx_m + dims[None, :], mask=row_ok[:, None] & dim_ok, other=0.0)
    target = x.to(tl.float32) - tl.load(b_dec_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)[None, :]
    target = tl.where(row_ok[:, None] & dim_ok, target, 0.0)
    residual = target
    matching = target  # what the picks read under MATCHING
    chosen = tl.full([BLOCK_M, KP], -1, tl.int32)
    proj = tl.zeros([BLOCK_M, KP], tl.float32)  # Q^T target, built step by step
    q_rows = q_ptr + rows64[:, None] * (KP * BLOCK_D) + dims[None, :]  # row's Q[j] at + j * BLOCK_D
    r_rows = r_ptr + rows64[:, None] * (KP * KP) + cols_k[None, :]  # row's R[s, :] at + s * KP
    for step in range(K):
        read = matching if MATCHING else residual
        best = _omp_best_atom(read, atoms_ptr, sa_n, chosen, N, D, dims, False, BLOCK_M, BLOCK_N, KP)
        repeat = (tl.max((chosen == best[:, None]).to(tl.int32), 1) > 0) & row_ok
        if tl.max(repeat.to(tl.int32), 0) > 0:
            best = _omp_best_atom(read, atoms_ptr, sa_n, chosen, N, D, dims, True, BLOCK_M, BLOCK_N, KP)
        chosen = tl.where(cols_k[None, :] == step, best[:, None], chosen)
        v = tl.load(atoms_ptr + best[:, None].to(tl.int64) * sa_n + dims[None, :], mask=dim_ok, other=0.0)
        v = tl.where(row_ok[:, None], v.to(tl.float32), 0.0)
        if MATCHING:
            matching -= tl.sum(matching * v, 1)[:, None] * v
        r_row = tl.zeros([BLOCK_M, KP], tl.float32)
        for _ in range(2):
            for j in range(step):
                q_j = tl.load(q_rows + j * BLOCK_D)
                w = tl.sum(q_j * v, 1)
                v -= w[:, None] * q_j
                r_row += tl.where(cols_k[None, :] == j, w[:, None], 0.0)
        r_ss = tl.sqrt(tl.sum(v * v, 1) + ridge)
        q_s = v / r_ss[:, None]
        tl.store(q_rows + step * BLOCK_D, q_s)
        tl.store(r_rows + step * KP, tl.where(cols_k[None, :] == step, r_ss[:, None], r_row))
        y = tl.sum(q_s * residual, 1)
        proj = tl.where(cols_k[None, :] == step, y[:, None], proj)
        residual -= y[:, None] * q_s
    coefficients = tl.zeros([BLOCK_M, KP], tl.float32)
    for back in range(K):
        i = K - 1 - back
        r_col = tl.load(
            r_ptr + rows64[:, None] * (KP * KP) + cols_k[None, :] * KP + i,
            mask=(cols_k[None, :] > i) & (cols_k[None, :] < K),
            other=0.0,
        )  # R[j, i], j > i
        r_ii = tl.load(r_ptr + rows64 * (KP * KP) + i * KP + i)
        y_i = tl.sum(tl.where(cols_k[None, :] == i, proj, 0.0), 1)
        c_i = (y_i - tl.sum(r_col * coefficients, 1)) / r_ii
        coefficients = tl.where(cols_k[None, :] == i, c_i[:, None], coefficients)
    offsets = rows64[:, None] * K + cols_k[None, :]
    ok = row_ok[:, None] & (cols_k[None, :] < K)
    tl.store(out_i_ptr + offsets, chosen.to(tl.int64), mask=ok)
    tl.store(out_c_ptr + offsets, coefficients.to(out_c_ptr.dtype.element_ty), mask=ok)


def omp_encode(
    x: torch.Tensor, atoms: torch.Tensor, b_dec: torch.Tensor, k: int, ridge: float = 1e-6, pursuit: str = "omp"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy pursuit of ``x [M, d]`` over ``atoms [N, d]`` -> ``(int64 [M, k], signed [M, k])``, indices in
    selection order like the reference, whose ``pursuit`` ("omp" or "mp") it takes.

    One program codes ``BLOCK_M`` rows through all ``k`` steps, so every step's correlation pass (the cost:
    ``k * N * d`` per row) shares each atom tile across the rows via ``tl.dot``. Rows are launched in chunks that
    keep the per-row QR scratch (``KP * (d + KP)`` floats) under ``_OMP_SCRATCH_BYTES``."""
    m, d = x.shape
    n = atoms.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of atoms {n}")
    if pursuit not in PURSUITS:
        raise ValueError(f"pursuit must be one of {PURSUITS}, got {pursuit!r}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if atoms.stride(-1) != 1:
        atoms = atoms.contiguous()
    kp = triton.next_power_of_2(k)
    block_m, block_d = 16, max(16, triton.next_power_of_2(d))
    block_n = 64 if block_d >= 256 else 128
    indices = torch.full((m, k), -1, device=x.device, dtype=torch.int64)
    coefficients = torch.full((m, k), float("nan"), device=x.device, dtype=x.dtype)
    chunk = max(block_m, _OMP_SCRATCH_BYTES // (4 * kp * (block_d + kp)) // block_m * block_m)
    for r0 in range(0, m, chunk):
        rows = min(chunk, m - r0)
        padded = triton.cdiv(rows, block_m) * block_m  # programs touch whole row blocks of scratch
        q = scratch((padded, kp, block_d), x.device)
        r = scratch((padded, kp, kp), x.device)
        _omp_kernel[(triton.cdiv(rows, block_m),)](
            x[r0:],
            x.stride(0),
            atoms,
            atoms.stride(0),
            b_dec,
            indices[r0:],
            coefficients[r0:],
            q,
            r,
            rows,
            n,
            d,
            ridge,
            K=k,
            KP=kp,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            MATCHING=pursuit == "mp",
        )
    return indices, coefficients
