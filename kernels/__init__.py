"""Hot-path ops of the cache, each with a PyTorch reference (``reference.py``) and a Triton kernel.

``backend="torch"`` runs the references (the CPU path); ``backend="triton"`` runs the Triton kernels, on CUDA or on
the CPU under ``TRITON_INTERPRET=1``. Triton is imported only when a Triton backend is asked for.
"""

from __future__ import annotations

import os

import torch

from .reference import (
    CompressedKV,
    apply_rope,
    decode_reference,
    omp_encode_reference,
    sparse_attention_reference,
    topk_encode_reference,
    undo_rope,
)

BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "BACKENDS",
    "CompressedKV",
    "apply_rope",
    "decode_reference",
    "encode",
    "resolve_backend",
    "sparse_attention",
    "undo_rope",
]


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` takes Triton on CUDA tensors and PyTorch elsewhere; ``triton`` off CUDA needs TRITON_INTERPRET=1."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors runs only under the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton, or use backend='torch'"
        )
    return backend


def encode(
    x: torch.Tensor, sae: dict[str, torch.Tensor], k: int, encoder: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code ``x [M, d]`` with one SAE (``W_enc, b_enc, W_dec, b_dec``) -> ``(indices [M, k], coefficients [M, k])``."""
    if backend == "triton":
        from . import triton_encode

        if encoder == "omp":
            return triton_encode.omp_encode(x, sae["W_dec"], sae["b_dec"], k)
        return triton_encode.topk_encode(x, sae["W_enc"], sae["b_enc"], sae["b_dec"], k)
    if encoder == "omp":
        return omp_encode_reference(x, sae["W_dec"], sae["b_dec"], k)
    return topk_encode_reference(x, sae["W_enc"], sae["b_enc"], sae["b_dec"], k)


def sparse_attention(
    query: torch.Tensor,
    kv: CompressedKV,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    backend: str,
) -> torch.Tensor:
    """Decode-into-attention over ``sinks | codes | window``; see :func:`reference.sparse_attention_reference`."""
    if backend == "triton":
        from . import triton_attention

        return triton_attention.sparse_attention(query, kv, mask, scaling, softcap)
    return sparse_attention_reference(query, kv, mask, scaling, softcap)
