"""Triton decode-into-attention over a ``sinks | codes | window`` cache; drop-in for
:func:`reference.sparse_attention_reference`.

Design (decode: ``G * Lq`` query rows per KV head, ``G = Hq / Hkv``):

* **GQA.** Every program works on one ``(batch, KV head)`` and all of its ``R = G * Lq`` query rows at once, so the
  codes and dense tokens of a KV head are read once for the whole group.
* **Post-RoPE keys: gather, don't rebuild.** ``_query_table_kernel`` computes ``P = D_key q^T`` once per step,
  laid out ``[B, Hkv, N, R]`` so that one code index addresses the ``R`` scores of the whole group contiguously
  (one 32-byte sector for ``R <= 8``). A compressed key's score is then ``sum_j c_j P[i_j] + q . b_key``: ``k``
  gathers of ``R`` floats from a table that stays in L1/L2, against ``k * d`` dictionary elements (``k * d * 2``
  bytes through L2) to rebuild the key in registers. Bytes decide it: 32 B vs 2 KB per token at k=8, d=128.
* **Pre-RoPE keys: rebuild and rotate.** The rotation depends on the token's position, so no per-step table can
  absorb it. The key is rebuilt from ``k`` gathered atoms as two halves, rotated by ``cos/sin(pos * inv_freq) *
  rope_scaling`` with the rotate-half convention of :func:`reference.apply_rope`, and dotted with the query.
* **Values in atom space.** A compressed value adds ``p_t * c_tj`` to atom ``i_tj``'s weight (one ``R``-wide atomic
  add per code into ``W [B, Hkv, N, R]``), and ``W^T D_value`` is formed once per step (``_atoms_to_output_kernel``).
  Rebuilding values in registers would move ``k * d`` dictionary elements per token (4 KB at k=16, d=128, fp16:
  8x a dense fp16 token) through L2; atom space moves ``k * R`` floats. Atomic adds need one softmax scale for
  the whole row, so attention runs in two passes over the sequence:

  1. ``_scores_kernel``: split-K over ``[sinks | codes | window]`` chunks (flash-decoding). Dense chunks run an
     online softmax with their values; code chunks write their scaled, soft-capped, masked scores (``4 R`` bytes
     per token, vs ``k * (index + coefficient)`` bytes of codes read) and their chunk max / sum-exp.
  2. ``_combine_kernel``: the flash-decoding reduction: row max, normaliser, the dense chunks' outputs and the
     value-bias share, and the row's ``(max, 1 / sum)`` for step 3.
  3. ``_scatter_values_kernel``: code chunks turn scores into probabilities and scatter them into ``W``.
  4. ``_atoms_to_output_kernel``: ``out += W^T D_value``, split over atoms.

* **Masks and softcap** follow the reference: ``tanh(s * scaling / softcap) * softcap``, masked slots ``-inf``,
  and a row that may attend to nothing returns zeros.

Prefill (``G * Lq > MAX_ROWS``) runs :func:`reference.sparse_attention_reference`: with many query rows the work
is matrix-matrix (``Q D^T`` and the atom-space product are GEMMs that cuBLAS already does at peak), every program
would hold ``R x d`` queries and ``R x chunk`` scores in registers, and the ``[B, Hkv, N, R]`` tables grow with
``Lq``; decode kernels buy nothing there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import CompressedKV, sparse_attention_reference
from .triton_launch import scratch, target_programs

# The kernels' signatures and launches group their arguments a line each (a tensor's pointers with its strides,
# the sizes, the compile-time constants), so a launch reads against its signature. The formatter would put one
# argument a line (60 lines for _scores_kernel): they are left as written (fmt: skip on the signatures, fmt: off
# and on around the launches).
MAX_ROWS = 64  # query rows per KV head (G * Lq) handled by the kernels; above it, the reference


@triton.jit
def _finish_scores(
    s,
    r,
    cols,
    col_ok,
    rows_ok,
    mask_ptr,
    sm_b,
    sm_l,
    b,
    LQ,
    col0,
    scaling,
    softcap,
    HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Scale, soft-cap and mask raw scores ``s [R, T]`` of slots ``col0 + cols``; invalid entries -> -inf."""
    s = s * scaling
    if HAS_SOFTCAP:
        s = (1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * s / softcap, 80.0)) + 1.0)) * softcap  # tanh; e^80 fits fp32
    ok = rows_ok[:, None] & col_ok[None, :]
    if HAS_MASK:
        visible = tl.load(mask_ptr + b * sm_b + (r % LQ)[:, None] * sm_l + col0 + cols[None, :], mask=ok, other=0)
        ok = ok & (visible != 0)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _online_step(m, sum_exp, s):
    """One online-softmax step over scores ``s [R, T]``: new max, rescale factor, probabilities, new sum."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, alpha, p, sum_exp * alpha + tl.sum(p, 1)


@triton.jit
def _dense_chunk(
    q,
    r,
    rows_ok,
    k_ptr,
    v_ptr,
    sd_t,
    start,
    length,
    col0,
    mask_ptr,
    sm_b,
    sm_l,
    b,
    LQ,
    scaling,
    softcap,
    D,
    CHUNK,
    HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Online softmax of the rows over dense tokens ``[start, start + CHUNK)`` of one region (sinks or window)."""
    dims = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_T)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    sum_exp = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for t0 in range(start, tl.minimum(start + CHUNK, length), BLOCK_T):
        tok = t0 + cols
        ok = (tok[:, None] < length) & (dims[None, :] < D)
        offsets = tok[:, None].to(tl.int64) * sd_t + dims[None, :]
        keys = tl.load(k_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(keys), input_precision="ieee")
        s = _finish_scores(
            s, r, tok, tok < length, rows_ok, mask_ptr, sm_b, sm_l, b, LQ, col0, scaling, softcap, HAS_MASK, HAS_SOFTCAP
        )
        m, alpha, p, sum_exp = _online_step(m, sum_exp, s)
        values = tl.load(v_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, values, input_precision="ieee")
    return m, sum_exp, acc


@triton.jit
def _scores_kernel(
    q_ptr, sq_b, sq_h, sq_l,
    sk_ptr, sv_ptr, ss_b, ss_h, ss_t,
    wk_ptr, wv_ptr, sw_b, sw_h, sw_t,
    ki_ptr, kc_ptr, sc_b, sc_h, sc_t,
    kbias_ptr, katoms_ptr, sa_h, sa_n, table_ptr,
    pos_ptr, sp_b, invf_ptr, rope_scaling,
    mask_ptr, sm_b, sm_l,
    scores_ptr, m_ptr, l_ptr, acc_ptr,
    H, G, LQ, ROWS, S, C, WLEN, N, D, KK, n_sink_chunks, n_code_chunks, CHUNK, scaling, softcap,
    HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRE_ROPE: tl.constexpr, SHARED_DICT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Pass 1, one program per ``(batch * KV head, chunk)``: chunk max and sum-exp of every row; dense chunks also
    their un-normalised output ``[R, d]``, code chunks their final scores (``scores [B, Hkv, R, C]``)."""
    bh = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    b = bh // H
    h = bh % H
    r = tl.arange(0, BLOCK_R)
    rows_ok = r < ROWS
    dims = tl.arange(0, BLOCK_D)
    q_rows = q_ptr + b * sq_b + (h * G + r // LQ)[:, None] * sq_h + (r % LQ)[:, None] * sq_l
    stat = bh * n_chunks * ROWS + chunk * ROWS + r
    if (chunk >= n_sink_chunks) & (chunk < n_sink_chunks + n_code_chunks):
        hd = 0 if SHARED_DICT else h
        start = (chunk - n_sink_chunks) * CHUNK
        cols = tl.arange(0, BLOCK_T)
        codes = tl.arange(0, BLOCK_K)
        code_base = b * sc_b + h * sc_h
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        sum_exp = tl.zeros([BLOCK_R], tl.float32)
        if PRE_ROPE:
            half = D // 2
            hcols = tl.arange(0, BLOCK_HALF)
            h_ok = hcols < half
            q_lo = tl.load(q_rows + hcols[None, :], mask=rows_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            q_hi = tl.load(q_rows + half + hcols[None, :], mask=rows_ok[:, None] & h_ok[None, :], other=0.0).to(
                tl.float32
            )
            bias_lo = tl.load(kbias_ptr + hd * D + hcols, mask=h_ok, other=0.0).to(tl.float32)
            bias_hi = tl.load(kbias_ptr + hd * D + half + hcols, mask=h_ok, other=0.0).to(tl.float32)
            inv_freq = tl.load(invf_ptr + hcols, mask=h_ok, other=0.0).to(tl.float32)
        else:
            q = tl.load(q_rows + dims[None, :], mask=rows_ok[:, None] & (dims[None, :] < D), other=0.0)
            bias = tl.load(kbias_ptr + hd * D + dims, mask=dims < D, other=0.0).to(tl.float32)
            q_bias = tl.sum(q.to(tl.float32) * bias[None, :], 1)
            table_rows = table_ptr + bh * N * ROWS + r
        for t0 in range(start, tl.minimum(start + CHUNK, C), BLOCK_T):
            tok = t0 + cols
            tok_ok = tok < C
            if PRE_ROPE:
                k_lo = tl.zeros([BLOCK_T, BLOCK_HALF], tl.float32) + bias_lo[None, :]
                k_hi = tl.zeros([BLOCK_T, BLOCK_HALF], tl.float32) + bias_hi[None, :]
                atom_ok = tok_ok[:, None] & h_ok[None, :]
                for j in range(0, KK):  # one code of every token at a time: [T, d/2] gathers, no 3-D tile
                    code = code_base + tok.to(tl.int64) * sc_t + j
                    index = tl.load(ki_ptr + code, mask=tok_ok, other=0).to(tl.int64)
                    coef = tl.load(kc_ptr + code, mask=tok_ok, other=0.0).to(tl.float32)
                    atom_rows = katoms_ptr + hd * sa_h + index[:, None] * sa_n + hcols[None, :]
                    k_lo += coef[:, None] * tl.load(atom_rows, mask=atom_ok, other=0.0).to(tl.float32)
                    k_hi += coef[:, None] * tl.load(atom_rows + half, mask=atom_ok, other=0.0).to(tl.float32)
                position = tl.load(pos_ptr + b * sp_b + tok, mask=tok_ok, other=0).to(tl.float32)
                angle = position[:, None] * inv_freq[None, :]
                cos = tl.cos(angle) * rope_scaling
                sin = tl.sin(angle) * rope_scaling
                rot_lo = k_lo * cos - k_hi * sin
                rot_hi = k_hi * cos + k_lo * sin
                s = tl.dot(q_lo, tl.trans(rot_lo), input_precision="ieee")
                s += tl.dot(q_hi, tl.trans(rot_hi), input_precision="ieee")
            else:
                code_ok = tok_ok[:, None] & (codes[None, :] < KK)
                code_offsets = code_base + tok[:, None].to(tl.int64) * sc_t + codes[None, :]
                index = tl.load(ki_ptr + code_offsets, mask=code_ok, other=0).to(tl.int64)
                coef = tl.load(kc_ptr + code_offsets, mask=code_ok, other=0.0).to(tl.float32)
                gathered = tl.load(
                    table_rows[:, None, None] + index[None, :, :] * ROWS,
                    mask=rows_ok[:, None, None] & code_ok[None, :, :],
                    other=0.0,
                )
                s = tl.sum(gathered * coef[None, :, :], 2) + q_bias[:, None]
            s = _finish_scores(
                s, r, tok, tok_ok, rows_ok, mask_ptr, sm_b, sm_l, b, LQ, S, scaling, softcap, HAS_MASK, HAS_SOFTCAP
            )
            tl.store(
                scores_ptr + (bh * ROWS + r[:, None]) * C + tok[None, :], s, mask=rows_ok[:, None] & tok_ok[None, :]
            )
            m, _, _, sum_exp = _online_step(m, sum_exp, s)
        tl.store(m_ptr + stat, m, mask=rows_ok)
        tl.store(l_ptr + stat, sum_exp, mask=rows_ok)
    else:
        q = tl.load(q_rows + dims[None, :], mask=rows_ok[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)
        if chunk < n_sink_chunks:
            m, sum_exp, acc = _dense_chunk(
                q,
                r,
                rows_ok,
                sk_ptr + b * ss_b + h * ss_h,
                sv_ptr + b * ss_b + h * ss_h,
                ss_t,
                chunk * CHUNK,
                S,
                0,
                mask_ptr,
                sm_b,
                sm_l,
                b,
                LQ,
                scaling,
                softcap,
                D,
                CHUNK,
                HAS_MASK,
                HAS_SOFTCAP,
                BLOCK_R,
                BLOCK_T,
                BLOCK_D,
            )
        else:
            m, sum_exp, acc = _dense_chunk(
                q,
                r,
                rows_ok,
                wk_ptr + b * sw_b + h * sw_h,
                wv_ptr + b * sw_b + h * sw_h,
                sw_t,
                (chunk - n_sink_chunks - n_code_chunks) * CHUNK,
                WLEN,
                S + C,
                mask_ptr,
                sm_b,
                sm_l,
                b,
                LQ,
                scaling,
                softcap,
                D,
                CHUNK,
                HAS_MASK,
                HAS_SOFTCAP,
                BLOCK_R,
                BLOCK_T,
                BLOCK_D,
            )
        tl.store(m_ptr + stat, m, mask=rows_ok)
        tl.store(l_ptr + stat, sum_exp, mask=rows_ok)
        tl.store(acc_ptr + stat[:, None] * D + dims[None, :], acc, mask=rows_ok[:, None] & (dims[None, :] < D))


@triton.jit
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, vbias_ptr, out_ptr, row_max_ptr, row_inv_ptr,
    H, ROWS, D, n_chunks, n_sink_chunks, n_code_chunks,
    SHARED_DICT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Flash-decoding reduction for one ``(batch, KV head)``: combines the chunks' max / sum-exp, writes the dense
    chunks' normalised output plus the value-bias share ``(sum of code probabilities) * b_value`` to ``out``, and
    ``(row max, 1 / row sum)`` for the scatter pass. A row with no visible slot gets zeros."""
    bh = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    rows_ok = r < ROWS
    dims = tl.arange(0, BLOCK_D)
    chunks = tl.arange(0, BLOCK_C)
    base = bh * n_chunks * ROWS
    row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for c0 in range(0, n_chunks, BLOCK_C):
        ok = (c0 + chunks[:, None] < n_chunks) & rows_ok[None, :]
        m = tl.load(m_ptr + base + (c0 + chunks[:, None]) * ROWS + r[None, :], mask=ok, other=float("-inf"))
        row_max = tl.maximum(row_max, tl.max(m, 0))
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.zeros([BLOCK_R], tl.float32)
    code_total = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, n_chunks, BLOCK_C):
        chunk = c0 + chunks[:, None]
        ok = (chunk < n_chunks) & rows_ok[None, :]
        m = tl.load(m_ptr + base + chunk * ROWS + r[None, :], mask=ok, other=float("-inf"))
        sum_exp = tl.load(l_ptr + base + chunk * ROWS + r[None, :], mask=ok, other=0.0)
        part = sum_exp * tl.exp(m - row_max[None, :])
        total += tl.sum(part, 0)
        is_code = (chunk >= n_sink_chunks) & (chunk < n_sink_chunks + n_code_chunks)
        code_total += tl.sum(tl.where(is_code, part, 0.0), 0)
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    out = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for chunk in range(0, n_chunks):
        if (chunk < n_sink_chunks) | (chunk >= n_sink_chunks + n_code_chunks):
            stat = base + chunk * ROWS + r
            scale = tl.exp(tl.load(m_ptr + stat, mask=rows_ok, other=float("-inf")) - row_max)
            acc = tl.load(
                acc_ptr + stat[:, None] * D + dims[None, :], mask=rows_ok[:, None] & (dims[None, :] < D), other=0.0
            )
            out += scale[:, None] * acc
    hd = 0 if SHARED_DICT else bh % H
    vbias = tl.load(vbias_ptr + hd * D + dims, mask=dims < D, other=0.0).to(tl.float32)
    out = out * inv[:, None] + (code_total * inv)[:, None] * vbias[None, :]
    rows = bh * ROWS + r
    tl.store(out_ptr + rows[:, None] * D + dims[None, :], out, mask=rows_ok[:, None] & (dims[None, :] < D))
    tl.store(row_max_ptr + rows, row_max, mask=rows_ok)
    tl.store(row_inv_ptr + rows, inv, mask=rows_ok)


@triton.jit
def _scatter_values_kernel(
    scores_ptr, row_max_ptr, row_inv_ptr, vi_ptr, vc_ptr, sc_b, sc_h, sc_t, weights_ptr,
    H, ROWS, C, N, KV, CHUNK,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Pass 2, one program per ``(batch * KV head, code chunk)``: ``W[b, h, i_tj, :] += p_t * c_tj`` with the
    final probabilities ``p = exp(score - row max) / row sum``; masked slots (p = 0) issue no atomics."""
    bh = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * CHUNK
    b = bh // H
    h = bh % H
    r = tl.arange(0, BLOCK_R)
    rows_ok = r < ROWS
    cols = tl.arange(0, BLOCK_T)
    codes = tl.arange(0, BLOCK_K)
    rows = bh * ROWS + r
    row_max = tl.load(row_max_ptr + rows, mask=rows_ok, other=0.0)
    row_inv = tl.load(row_inv_ptr + rows, mask=rows_ok, other=0.0)
    weight_rows = weights_ptr + bh * N * ROWS + r
    for t0 in range(start, tl.minimum(start + CHUNK, C), BLOCK_T):
        tok = t0 + cols
        tok_ok = tok < C
        s = tl.load(
            scores_ptr + rows[:, None] * C + tok[None, :], mask=rows_ok[:, None] & tok_ok[None, :], other=float("-inf")
        )
        p = tl.exp(s - row_max[:, None]) * row_inv[:, None]
        code_ok = tok_ok[:, None] & (codes[None, :] < KV)
        code_offsets = b * sc_b + h * sc_h + tok[:, None].to(tl.int64) * sc_t + codes[None, :]
        index = tl.load(vi_ptr + code_offsets, mask=code_ok, other=0).to(tl.int64)
        coef = tl.load(vc_ptr + code_offsets, mask=code_ok, other=0.0).to(tl.float32)
        tl.atomic_add(
            weight_rows[:, None, None] + index[None, :, :] * ROWS,
            p[:, :, None] * coef[None, :, :],
            mask=(p[:, :, None] > 0) & code_ok[None, :, :],
            sem="relaxed",
        )


@triton.jit
def _query_table_kernel(
    q_ptr, sq_b, sq_h, sq_l, atoms_ptr, sa_h, sa_n, table_ptr,
    H, G, LQ, ROWS, N, D, atoms_per_program,
    SHARED_DICT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``P[b, h, n, r] = D_key[h][n] . q[b, h, r]`` for one ``(batch * KV head, atom range)``."""
    bh = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * atoms_per_program
    stop = tl.minimum(start + atoms_per_program, N)
    b = bh // H
    h = bh % H
    r = tl.arange(0, BLOCK_R)
    rows_ok = r < ROWS
    dims = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_N)
    q = tl.load(
        q_ptr + b * sq_b + (h * G + r // LQ)[:, None] * sq_h + (r % LQ)[:, None] * sq_l + dims[None, :],
        mask=rows_ok[:, None] & (dims[None, :] < D),
        other=0.0,
    ).to(tl.float32)
    atoms_head = atoms_ptr + (0 if SHARED_DICT else h) * sa_h
    for n0 in range(start, stop, BLOCK_N):
        atoms = n0 + cols
        tile = tl.load(
            atoms_head + atoms[:, None].to(tl.int64) * sa_n + dims[None, :],
            mask=(atoms[:, None] < stop) & (dims[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        p = tl.dot(tile, tl.trans(q), input_precision="ieee")
        tl.store(
            table_ptr + (bh * N + atoms[:, None]) * ROWS + r[None, :],
            p,
            mask=(atoms[:, None] < stop) & rows_ok[None, :],
        )


@triton.jit
def _atoms_to_output_kernel(
    weights_ptr, atoms_ptr, sa_h, sa_n, out_ptr, H, ROWS, N, D, atoms_per_program,
    SHARED_DICT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``out[b, h] += W[b, h]^T D_value[h]`` over one atom range (atomic adds: several ranges share an output)."""
    bh = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * atoms_per_program
    stop = tl.minimum(start + atoms_per_program, N)
    h = bh % H
    r = tl.arange(0, BLOCK_R)
    rows_ok = r < ROWS
    dims = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_N)
    atoms_head = atoms_ptr + (0 if SHARED_DICT else h) * sa_h
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        atoms = n0 + cols
        w = tl.load(
            weights_ptr + (bh * N + atoms[None, :]) * ROWS + r[:, None],
            mask=rows_ok[:, None] & (atoms[None, :] < stop),
            other=0.0,
        )
        tile = tl.load(
            atoms_head + atoms[:, None].to(tl.int64) * sa_n + dims[None, :],
            mask=(atoms[:, None] < stop) & (dims[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(w, tile, input_precision="ieee")
    rows = bh * ROWS + r
    tl.atomic_add(
        out_ptr + rows[:, None] * D + dims[None, :], acc, mask=rows_ok[:, None] & (dims[None, :] < D), sem="relaxed"
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sparse_attention(
    query: torch.Tensor,
    kv: CompressedKV,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    *,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Attention of ``query [B, Hq, Lq, d]`` over ``kv`` (see the module docstring) -> ``[B, Hq, Lq, d]`` in the
    query's dtype. ``mask`` is bool ``[B, Lq, L]`` in slot order (True = may attend) or None. ``chunk_tokens`` is
    the sequence split (default: enough chunks to fill the GPU); with ``G * Lq > MAX_ROWS`` the reference runs."""
    b, hq, lq, d = query.shape
    h = kv.window_keys.shape[1]
    g = hq // h
    rows = g * lq
    if rows > MAX_ROWS:
        return sparse_attention_reference(query, kv, mask, scaling, softcap)
    device = query.device
    s, c, w = kv.num_sinks, kv.num_compressed, kv.num_window
    n = kv.key_atoms.shape[1]
    shared = kv.key_atoms.shape[0] == 1
    pre_rope = kv.key_positions is not None
    query = _last_dim_contiguous(query)
    sink_keys, sink_values = _last_dim_contiguous(kv.sink_keys), _last_dim_contiguous(kv.sink_values)
    window_keys, window_values = _last_dim_contiguous(kv.window_keys), _last_dim_contiguous(kv.window_values)
    if sink_keys.stride() != sink_values.stride():
        sink_keys, sink_values = sink_keys.contiguous(), sink_values.contiguous()
    if window_keys.stride() != window_values.stride():
        window_keys, window_values = window_keys.contiguous(), window_values.contiguous()
    key_indices, key_coefficients = kv.key_indices.contiguous(), kv.key_coefficients.contiguous()
    value_indices, value_coefficients = kv.value_indices.contiguous(), kv.value_coefficients.contiguous()
    key_atoms, value_atoms = kv.key_atoms.contiguous(), kv.value_atoms.contiguous()
    key_bias, value_bias = kv.key_bias.contiguous(), kv.value_bias.contiguous()
    if mask is not None:
        mask = _last_dim_contiguous(mask.to(torch.bool)).view(torch.uint8)

    block_r = max(16, triton.next_power_of_2(rows))
    block_d = max(16, triton.next_power_of_2(d))
    block_k = triton.next_power_of_2(max(kv.key_indices.shape[-1], kv.value_indices.shape[-1]))
    # Code tiles are [R, T, k] gathers: keep them near 8K elements (registers); dense / pre-RoPE tiles are [T, d].
    block_t = 32 if pre_rope or block_d >= 256 else max(16, min(64, 8192 // (block_r * block_k)))
    if chunk_tokens is None:
        per_head = max(1, target_programs(device, 8) // (b * h))
        chunk_tokens = triton.cdiv(max(s + c + w, 1), per_head)
    chunk = max(block_t, triton.cdiv(chunk_tokens, block_t) * block_t)
    n_sink, n_code, n_win = triton.cdiv(s, chunk), triton.cdiv(c, chunk), triton.cdiv(w, chunk)
    n_chunks = n_sink + n_code + n_win
    out = torch.full((b, h, rows, d), float("nan"), device=device, dtype=torch.float32)
    if n_chunks == 0:
        return out.zero_().view(b, hq, lq, d).to(query.dtype)

    block_n = 64 if block_d >= 256 else 128

    def atom_split(atoms: int) -> tuple[int, int]:
        splits = max(1, min(target_programs(device, 8) // (b * h), triton.cdiv(atoms, block_n)))
        per_program = triton.cdiv(triton.cdiv(atoms, splits), block_n) * block_n
        return triton.cdiv(atoms, per_program), per_program

    q_strides = (query.stride(0), query.stride(1), query.stride(2))
    table = scores = query  # placeholders for unused pointers
    if c:
        scores = scratch((b, h, rows, c), device)
        if not pre_rope:
            table = scratch((b, h, n, rows), device)
            atom_splits, atoms_per_program = atom_split(n)
            # fmt: off
            _query_table_kernel[(b * h, atom_splits)](
                query, *q_strides, key_atoms, key_atoms.stride(0), key_atoms.stride(1), table,
                h, g, lq, rows, n, d, atoms_per_program,
                SHARED_DICT=shared, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d,
            )
            # fmt: on
    chunk_max = scratch((b, h, n_chunks, rows), device)
    chunk_sum = scratch((b, h, n_chunks, rows), device)
    chunk_out = scratch((b, h, n_chunks, rows, d), device)
    positions = kv.key_positions.contiguous() if pre_rope else key_indices
    inv_freq = kv.rope_inv_freq.to(device=device, dtype=torch.float32).contiguous() if pre_rope else query
    # fmt: off
    _scores_kernel[(b * h, n_chunks)](
        query, *q_strides,
        sink_keys, sink_values, sink_keys.stride(0), sink_keys.stride(1), sink_keys.stride(2),
        window_keys, window_values, window_keys.stride(0), window_keys.stride(1), window_keys.stride(2),
        key_indices, key_coefficients, key_indices.stride(0), key_indices.stride(1), key_indices.stride(2),
        key_bias, key_atoms, key_atoms.stride(0), key_atoms.stride(1), table,
        positions, positions.stride(0), inv_freq, float(kv.rope_scaling),
        mask if mask is not None else query, mask.stride(0) if mask is not None else 0,
        mask.stride(1) if mask is not None else 0,
        scores, chunk_max, chunk_sum, chunk_out,
        h, g, lq, rows, s, c, w, n, d, key_indices.shape[-1], n_sink, n_code, chunk, float(scaling),
        float(softcap) if softcap is not None else 1.0,
        HAS_MASK=mask is not None, HAS_SOFTCAP=softcap is not None, PRE_ROPE=pre_rope, SHARED_DICT=shared,
        BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_D=block_d,
        BLOCK_K=triton.next_power_of_2(key_indices.shape[-1]), BLOCK_HALF=max(16, triton.next_power_of_2(d // 2)),
    )
    # fmt: on
    row_max = scratch((b, h, rows), device)
    row_inv = scratch((b, h, rows), device)
    # fmt: off
    _combine_kernel[(b * h,)](
        chunk_max, chunk_sum, chunk_out, value_bias, out, row_max, row_inv,
        h, rows, d, n_chunks, n_sink, n_code,
        SHARED_DICT=value_atoms.shape[0] == 1, BLOCK_R=block_r, BLOCK_C=min(64, triton.next_power_of_2(n_chunks)),
        BLOCK_D=block_d,
    )
    # fmt: on
    if c:
        n_value = value_atoms.shape[1]
        weights = torch.zeros((b, h, n_value, rows), device=device, dtype=torch.float32)
        # fmt: off
        _scatter_values_kernel[(b * h, n_code)](
            scores, row_max, row_inv, value_indices, value_coefficients,
            value_indices.stride(0), value_indices.stride(1), value_indices.stride(2), weights,
            h, rows, c, n_value, value_indices.shape[-1], chunk,
            BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_K=triton.next_power_of_2(value_indices.shape[-1]),
        )
        # fmt: on
        atom_splits, atoms_per_program = atom_split(n_value)
        # fmt: off
        _atoms_to_output_kernel[(b * h, atom_splits)](
            weights, value_atoms, value_atoms.stride(0), value_atoms.stride(1), out,
            h, rows, n_value, d, atoms_per_program,
            SHARED_DICT=value_atoms.shape[0] == 1, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d,
        )
        # fmt: on
    return out.view(b, hq, lq, d).to(query.dtype)
