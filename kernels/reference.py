"""Plain PyTorch references for the two hot paths of the cache: encode-on-append and decode-into-attention.

These are the CPU path of the product and the ground truth that the Triton kernels beside this file are tested
against. They compute in float32 whatever the storage dtype is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def topk_encode_reference(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SAE's one-shot encoder: ``TopK((x - b_dec) W_enc + b_enc)`` then ReLU. ``x [M, d]`` -> ``[M, k]`` codes."""
    pre = (x.float() - b_dec.float()) @ W_enc.float() + b_enc.float()
    values, indices = pre.topk(k, dim=-1)
    return indices, torch.relu(values).to(x.dtype)


def omp_encode_reference(
    x: torch.Tensor, atoms: torch.Tensor, b_dec: torch.Tensor, k: int, ridge: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit over unit-norm ``atoms [N, d]``: ``k`` greedy steps, each picking the atom most
    correlated (in absolute value) with the residual, then refitting all chosen coefficients by least squares.
    Coefficients are signed. ``x [M, d]`` -> ``(indices [M, k], coefficients [M, k])``."""
    target = x.float() - b_dec.float()
    atoms32 = atoms.float()
    m = target.shape[0]
    indices = torch.zeros(m, k, dtype=torch.long, device=x.device)
    coefficients = torch.zeros(m, k, dtype=torch.float32, device=x.device)
    chosen = torch.zeros(m, atoms.shape[0], dtype=torch.bool, device=x.device)
    residual = target
    rows = torch.arange(m, device=x.device)
    for step in range(k):
        correlation = (residual @ atoms32.T).abs().masked_fill(chosen, -1.0)
        best = correlation.argmax(dim=-1)
        indices[:, step] = best
        chosen[rows, best] = True
        selected = atoms32[indices[:, : step + 1]]  # [M, s, d]
        gram = selected @ selected.transpose(1, 2)
        gram.diagonal(dim1=1, dim2=2).add_(ridge)
        rhs = (selected @ target.unsqueeze(-1)).squeeze(-1)
        solution = torch.linalg.solve(gram, rhs)
        coefficients[:, : step + 1] = solution
        residual = target - (solution.unsqueeze(1) @ selected).squeeze(1)
    return indices, coefficients.to(x.dtype)


def decode_reference(indices: torch.Tensor, coefficients: torch.Tensor, atoms: torch.Tensor, bias: torch.Tensor):
    """Rebuild vectors from codes. ``indices/coefficients [B, H, C, k]``, ``atoms [Hd, N, d]``, ``bias [Hd, d]``
    with ``Hd`` 1 (shared by all KV heads) or ``H`` (one dictionary per KV head). Returns ``[B, H, C, d]`` float32."""
    b, h, c, k = indices.shape
    hd, n, d = atoms.shape
    head_offset = (torch.arange(h, device=indices.device) * n if hd > 1 else torch.zeros(h, device=indices.device))
    flat = indices.long() + head_offset.long().view(1, h, 1, 1)
    gathered = atoms.float().reshape(hd * n, d)[flat]  # [B, H, C, k, d]
    out = torch.einsum("bhck,bhckd->bhcd", coefficients.float(), gathered)
    return out + bias.float().view(1, hd, 1, d)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float):
    """cos/sin exactly as transformers' rotary embeddings build them: ``positions [...]`` -> ``[..., d]`` each."""
    freqs = positions[..., None].float() * inv_freq.float().to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0):
    """Rotate ``x [B, H, C, d]`` to ``positions [B, C]`` (the model's own RoPE, rotate-half convention)."""
    cos, sin = rope_cos_sin(positions, inv_freq, scaling)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x.float() * cos + rotate_half(x.float()) * sin


def undo_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0):
    """Inverse of :func:`apply_rope`: the key as it was before the model rotated it."""
    cos, sin = rope_cos_sin(positions, inv_freq, 1.0)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x.float() * cos - rotate_half(x.float()) * sin) / scaling


@dataclass
class CompressedKV:
    """One layer's cache as decode-into-attention reads it. Slots are ordered ``sinks | compressed | window``.

    Dense parts are ``[B, Hkv, L, d]``; codes are ``[B, Hkv, C, k]``; dictionaries are ``[Hd, N, d]`` atoms and
    ``[Hd, d]`` biases with ``Hd`` 1 or ``Hkv``. ``key_positions [B, C]`` is set when keys were coded before RoPE;
    then compressed keys are rebuilt and rotated to their position with ``rope_inv_freq`` / ``rope_scaling``.
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
    # Post-RoPE codes: one q . D^T product per query, then the scores are gathers of it weighted by coefficients.
    atom_scores = q @ kv.key_atoms.float().transpose(-1, -2).unsqueeze(0)  # [B, Hkv, GLq, N]
    index = kv.key_indices.long().reshape(b, h, 1, c * k).expand(-1, -1, q.shape[2], -1)
    gathered = atom_scores.gather(-1, index).view(b, h, q.shape[2], c, k)
    scores = (gathered * kv.key_coefficients.float().unsqueeze(2)).sum(-1)
    return scores + q @ kv.key_bias.float().view(1, -1, kv.key_bias.shape[-1], 1)


def _compressed_value_output(weights: torch.Tensor, kv: CompressedKV) -> torch.Tensor:
    """``weights [B, Hkv, G*Lq, C]`` over compressed tokens -> their share of the output ``[B, Hkv, G*Lq, d]``,
    accumulated in atom space and multiplied by the value dictionary once."""
    b, h, c, k = kv.value_indices.shape
    rows = weights.shape[2]
    n = kv.value_atoms.shape[1]
    contributions = (weights.unsqueeze(-1) * kv.value_coefficients.float().unsqueeze(2)).reshape(b, h, rows, c * k)
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
    scores = torch.cat(
        [
            q @ kv.sink_keys.float().transpose(-1, -2),
            _compressed_key_scores(q, kv) if c else q.new_zeros(b, h, groups * lq, 0),
            q @ kv.window_keys.float().transpose(-1, -2),
        ],
        dim=-1,
    ) * scaling
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
