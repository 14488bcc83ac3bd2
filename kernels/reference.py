"""Plain PyTorch implementations of the cache's two hot paths, encode-on-append and decode-into-attention, and
the pieces every backend shares.

* The references: ``omp_encode_reference``, ``topk_encode_reference``, ``sparse_attention_reference``. They are
  the ground truth that the C kernels (cpu_kernels.py) and the Triton kernels are tested against, and the
  ``backend="torch"`` path, which ``"auto"`` takes where neither kernel applies (no C compiler, a head_dim the C
  kernels do not take, a device without Triton). They compute in float32 whatever the storage dtype is.
* Shared by all backends and by training: ``CompressedKV`` (what attention reads of one layer), the RoPE tables
  and rotations (``rope_table``, ``apply_rope``, ``undo_rope``), the CSR code matrix.

Two choices keep this path fast without changing a result: codes are multiplied as one CSR sparse matrix
(:func:`code_matrix`; a sparse-dense matmul instead of materialising ``[..., k, d]`` gathered atoms, about 6x
faster at 4k tokens), and RoPE angles come from a table of ``cos``/``sin`` per integer position, shared by all
layers (:func:`rope_table`) instead of ``C x d`` transcendentals per layer and step.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

# How a pursuit encoder picks atoms (see omp_encode_reference); both fit the coefficients by least squares.
PURSUITS = ("omp", "mp")


def topk_encode_reference(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SAE's one-shot encoder: ``TopK((x - b_dec) W_enc + b_enc)`` then ReLU. ``x [M, d]`` -> ``[M, k]`` codes."""
    pre = (x.float() - b_dec.float()) @ W_enc.float() + b_enc.float()
    values, indices = pre.topk(k, dim=-1)
    return indices, torch.relu(values).to(x.dtype)


def omp_encode_reference(
    x: torch.Tensor, atoms: torch.Tensor, b_dec: torch.Tensor, k: int, eps: float = 1e-6, pursuit: str = "omp"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy pursuit over unit-norm ``atoms [N, d]``: ``k`` steps, each picking the atom most correlated (in
    absolute value) with a residual, never one twice; the coefficients are the least-squares fit of the target on
    the picked atoms, signed. ``x [M, d]`` -> ``(indices [M, k], coefficients [M, k])``.

    ``pursuit`` says which residual the picks read: ``"omp"`` (orthogonal matching pursuit) the target minus its
    projection on all atoms picked so far; ``"mp"`` (matching pursuit, then the same least-squares refit) the
    target minus each picked atom times its correlation at the time, which the CPU kernel updates at N multiply-
    adds per step instead of N * (step + 1).

    The least squares run as an incremental Gram-Schmidt QR of the chosen atoms (as the Triton kernel does): each
    step orthogonalises the new atom against the earlier ones and removes its direction from the residual; one
    triangular solve at the end gives the coefficients. An atom that adds no new direction (the residual was
    already exact) gets coefficient 0."""
    if pursuit not in PURSUITS:
        raise ValueError(f"pursuit must be one of {PURSUITS}, got {pursuit!r}")
    target = x.float() - b_dec.float()
    atoms32 = atoms.float()
    m, d = target.shape
    indices = torch.zeros(m, k, dtype=torch.long, device=x.device)
    basis = target.new_zeros(m, k, d)  # orthonormal directions of the chosen atoms
    upper = target.new_zeros(m, k, k)  # chosen atoms = upper^T . basis
    projections = target.new_zeros(m, k)  # target . basis
    residual = target.clone()
    matching = target.clone() if pursuit == "mp" else residual  # the residual the picks read
    for step in range(k):
        signed = matching @ atoms32.T
        correlation = signed.abs()
        correlation.scatter_(1, indices[:, :step], -1.0)  # never pick an atom twice
        best = correlation.argmax(dim=-1)
        indices[:, step] = best
        atom = atoms32[best]
        if pursuit == "mp":
            matching = matching - signed.gather(1, best.unsqueeze(1)) * atom
        if step:
            overlap = torch.bmm(basis[:, :step], atom.unsqueeze(-1)).squeeze(-1)
            upper[:, :step, step] = overlap
            atom = atom - torch.bmm(overlap.unsqueeze(1), basis[:, :step]).squeeze(1)
        norm = atom.norm(dim=-1)
        new_direction = norm > eps
        direction = atom / norm.clamp_min(eps).unsqueeze(-1) * new_direction.unsqueeze(-1)
        upper[:, step, step] = torch.where(new_direction, norm, torch.ones_like(norm))
        basis[:, step] = direction
        projection = (residual * direction).sum(-1)
        projections[:, step] = projection
        residual -= projection.unsqueeze(-1) * direction
    coefficients = torch.linalg.solve_triangular(upper, projections.unsqueeze(-1), upper=True).squeeze(-1)
    return indices, coefficients.to(x.dtype)


@functools.cache
def byte_float_table(dtype: torch.dtype) -> torch.Tensor:
    """The 256 values of a one-byte float format as float32, indexed by bit pattern (read-only)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()


def as_float32(t: torch.Tensor) -> torch.Tensor:
    """``t.float()``, with float8 read through a 256-entry table: PyTorch's CPU float8 cast is about 3x slower
    than the table gather, and coefficients are read on every decode step."""
    if t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or t.device.type != "cpu":
        return t.float()
    return byte_float_table(t.dtype).index_select(0, t.view(torch.uint8).reshape(-1).int()).view(t.shape)


def code_matrix(indices: torch.Tensor, coefficients: torch.Tensor, n_atoms: int, blocks: torch.Tensor) -> torch.Tensor:
    """Codes ``[B, H, C, k]`` as one CSR matrix ``[B*H*C, (max(blocks)+1) * n_atoms]``: row ``(b, h, c)`` holds its
    ``k`` coefficients at columns ``blocks[b, h] * n_atoms + index``. ``blocks [B, H]`` picks the block of atoms a
    row's indices refer to (its KV head's dictionary, or its own per-(b, h) table of atom scores)."""
    b, h, c, k = indices.shape
    columns = (indices.long() + (blocks.long() * n_atoms).view(b, h, 1, 1)).reshape(-1)
    rows = torch.arange(0, b * h * c * k + 1, k, device=indices.device)
    width = (int(blocks.max()) + 1) * n_atoms if blocks.numel() else n_atoms
    with warnings.catch_warnings():  # PyTorch's one-time "CSR support is in beta" notice says nothing to our users
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            rows, columns, as_float32(coefficients).reshape(-1), size=(b * h * c, width), check_invariants=False
        )  # fmt: skip  (valid by construction)


def decode_reference(indices: torch.Tensor, coefficients: torch.Tensor, atoms: torch.Tensor, bias: torch.Tensor):
    """Rebuild vectors from codes. ``indices/coefficients [B, H, C, k]``, ``atoms [Hd, N, d]``, ``bias [Hd, d]``
    with ``Hd`` 1 (shared by all KV heads) or ``H`` (one dictionary per KV head). Returns ``[B, H, C, d]`` float32."""
    b, h, c, k = indices.shape
    hd, n, d = atoms.shape
    if c == 0:
        return atoms.new_zeros(b, h, 0, d, dtype=torch.float32)
    blocks = (torch.arange(h, device=indices.device) if hd > 1 else indices.new_zeros(h)).expand(b, h)
    out = code_matrix(indices, coefficients, n, blocks) @ atoms.float().reshape(hd * n, d)
    return out.view(b, h, c, d) + bias.float().view(1, hd, 1, d)


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_table(length: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [>= length, d/2]`` of ``position * inv_freq`` for positions ``0, 1, ...``, computed as
    transformers' rotary embeddings compute them (float32 product, then cos/sin), so a lookup equals a direct
    evaluation bit for bit. One table per ``inv_freq`` and device, grown by doubling and shared by every layer:
    256 bytes per position at head_dim 64."""
    key = (inv_freq.device, inv_freq.dtype, tuple(inv_freq.tolist()))
    table = _ROPE_TABLES.get(key)
    if table is None or table[0].shape[0] < length:
        size = max(length, 2 * table[0].shape[0] if table is not None else 4096)
        freqs = torch.arange(size, device=inv_freq.device).float()[:, None] * inv_freq.float()
        table = _ROPE_TABLES[key] = (freqs.cos(), freqs.sin())
    return table


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles at integer ``positions [...]`` -> ``[..., d/2]`` each (from the shared table)."""
    if positions.numel() and int(positions.min()) >= 0:
        cos, sin = rope_table(int(positions.max()) + 1, inv_freq.to(positions.device))
        flat = positions.reshape(-1).long()
        return cos[flat].view(*positions.shape, -1), sin[flat].view(*positions.shape, -1)
    freqs = positions[..., None].float() * inv_freq.float().to(positions.device)
    return freqs.cos(), freqs.sin()


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, direction: float) -> torch.Tensor:
    """``x [B, H, C, d]`` rotated by ``direction * position`` in the rotate-half convention (pairs ``i, i + d/2``)."""
    cos, sin = rope_cos_sin(positions, inv_freq)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    first, second = x.float().chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out_first, out_second = out.chunk(2, dim=-1)  # written in place: 4 passes over x instead of 8 and a cat
    torch.mul(first, cos, out=out_first).addcmul_(second, sin, value=-direction)
    torch.mul(second, cos, out=out_second).addcmul_(first, sin, value=direction)
    return out


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0):
    """Rotate ``x [B, H, C, d]`` to ``positions [B, C]`` (the model's own RoPE, rotate-half convention)."""
    out = _rotate(x, positions, inv_freq, 1.0)
    return out if scaling == 1.0 else out * scaling


def undo_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0):
    """Inverse of :func:`apply_rope`: the key as it was before the model rotated it."""
    out = _rotate(x, positions, inv_freq, -1.0)
    return out if scaling == 1.0 else out / scaling


LEVEL_SCALE_DTYPE = torch.float8_e4m3fn  # the per-vector scale of coefficients stored as levels (packing.py)


@dataclass
class CompressedKV:
    """One layer's cache as decode-into-attention reads it. Slots are ordered ``sinks | compressed | window``.

    Dense parts are ``[B, Hkv, L, d]``; codes are ``[B, Hkv, C, k]``; dictionaries are ``[Hd, N, d]`` atoms and
    ``[Hd, d]`` biases with ``Hd`` 1 or ``Hkv``. ``key_positions [B, C]`` is set when keys were coded before RoPE;
    then compressed keys are rebuilt and rotated to their position with ``rope_inv_freq`` / ``rope_scaling``.
    ``packed_index_bits`` > 0 means the indices are still bit-packed (``uint8 [B, Hkv, C, bytes]``, packing.py);
    ``key_levels`` / ``value_levels`` (the value of each level code) that a kind's coefficients are still rows of a
    float8 scale and packed level codes (``uint8 [B, Hkv, C, bytes]``, packing.py's ``pack_level_rows``), with
    ``k_key`` / ``k_value`` atoms per vector: only the fused CPU kernels read them so; every other op gets them
    unpacked. Indices with a last dim of 0 (values of the rotated coder, :mod:`sta_cache.rotated_values`) store
    nothing: slot j of every vector is atom j.
    """

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    key_indices: torch.Tensor
    key_coefficients: torch.Tensor
    value_indices: torch.Tensor
    value_coefficients: torch.Tensor
    window_keys: torch.Tensor
    window_values: torch.Tensor
    key_atoms: torch.Tensor
    key_bias: torch.Tensor
    value_atoms: torch.Tensor
    value_bias: torch.Tensor
    key_positions: torch.Tensor | None = None
    rope_inv_freq: torch.Tensor | None = None
    rope_scaling: float = 1.0
    packed_index_bits: int = 0
    key_levels: torch.Tensor | None = None
    value_levels: torch.Tensor | None = None
    k_key: int = 0
    k_value: int = 0

    def k(self, kind: str) -> int:
        """Atoms per ``kind`` ("key" or "value") vector: ``k_key`` / ``k_value`` if set, else the last dim of the
        (unpacked) coefficients."""
        given = self.k_key if kind == "key" else self.k_value
        return given or (self.key_coefficients if kind == "key" else self.value_coefficients).shape[-1]

    @property
    def num_sinks(self) -> int:
        return self.sink_keys.shape[2]

    @property
    def num_compressed(self) -> int:
        return self.key_indices.shape[2]

    @property
    def num_window(self) -> int:
        return self.window_keys.shape[2]

    @property
    def length(self) -> int:
        return self.num_sinks + self.num_compressed + self.num_window


def _compressed_key_scores(q: torch.Tensor, kv: CompressedKV) -> torch.Tensor:
    """Scores of grouped queries ``q [B, Hkv, G*Lq, d]`` against the compressed keys -> ``[B, Hkv, G*Lq, C]``."""
    b, h, c, k = kv.key_indices.shape
    if kv.key_positions is not None:
        keys = decode_reference(kv.key_indices, kv.key_coefficients, kv.key_atoms, kv.key_bias)
        keys = apply_rope(keys, kv.key_positions, kv.rope_inv_freq, kv.rope_scaling)
        return q @ keys.transpose(-1, -2)
    # Post-RoPE codes: one q . D^T product per query, then each token's score is its coefficients times its
    # atoms' entries of that product: a sparse matmul of the codes with the stacked per-(b, h) atom scores.
    rows = q.shape[2]
    atom_scores = q @ kv.key_atoms.float().transpose(-1, -2).unsqueeze(0)  # [B, Hkv, GLq, N]
    n = atom_scores.shape[-1]
    blocks = torch.arange(b * h, device=q.device).view(b, h)
    scores = code_matrix(kv.key_indices, kv.key_coefficients, n, blocks) @ atom_scores.transpose(-1, -2).reshape(
        b * h * n, rows
    )
    scores = scores.view(b, h, c, rows).transpose(-1, -2)
    return scores + q @ kv.key_bias.float().view(1, -1, kv.key_bias.shape[-1], 1)


def _compressed_value_output(weights: torch.Tensor, kv: CompressedKV) -> torch.Tensor:
    """``weights [B, Hkv, G*Lq, C]`` over compressed tokens -> their share of the output ``[B, Hkv, G*Lq, d]``,
    accumulated in atom space and multiplied by the value dictionary once."""
    b, h, c, k = kv.value_indices.shape
    rows = weights.shape[2]
    n = kv.value_atoms.shape[1]
    coefficients = as_float32(kv.value_coefficients)
    contributions = (weights.unsqueeze(-1) * coefficients.unsqueeze(2)).reshape(b, h, rows, c * k)
    index = kv.value_indices.long().reshape(b, h, 1, c * k).expand(-1, -1, rows, -1)
    atom_weights = torch.zeros(b, h, rows, n, dtype=torch.float32, device=weights.device)
    atom_weights.scatter_add_(-1, index, contributions)
    out = atom_weights @ kv.value_atoms.float().unsqueeze(0)
    return out + weights.sum(-1, keepdim=True) * kv.value_bias.float().view(1, -1, 1, kv.value_bias.shape[-1])


def sparse_attention_reference(
    query: torch.Tensor,
    kv: CompressedKV,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of ``query [B, Hq, Lq, d]`` over ``kv`` without rebuilding compressed values (and, for post-RoPE
    key codes, without rebuilding compressed keys). ``mask`` is bool ``[B, Lq, L]`` (True = may attend) in slot
    order, or None for full visibility. Rows that may attend to nothing return zeros. Returns ``[B, Hq, Lq, d]``."""
    b, hq, lq, d = query.shape
    h = kv.window_keys.shape[1]
    groups = hq // h
    q = query.float().reshape(b, h, groups * lq, d)
    s, c = kv.num_sinks, kv.num_compressed
    scores = (
        torch.cat(
            [
                q @ kv.sink_keys.float().transpose(-1, -2),
                _compressed_key_scores(q, kv) if c else q.new_zeros(b, h, groups * lq, 0),
                q @ kv.window_keys.float().transpose(-1, -2),
            ],
            dim=-1,
        )
        * scaling
    )
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        visible = mask.view(b, 1, 1, lq, -1).expand(b, h, groups, lq, -1).reshape(b, h, groups * lq, -1)
        scores = scores.masked_fill(~visible, float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    weights = torch.exp(scores - peak)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out = weights[..., :s] @ kv.sink_values.float() + weights[..., s + c :] @ kv.window_values.float()
    if c:
        out = out + _compressed_value_output(weights[..., s : s + c], kv)
    return out.reshape(b, hq, lq, d).to(query.dtype)
