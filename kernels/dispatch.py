"""Routes the cache's two hot-path ops, encode-on-append and decode-into-attention, to a backend.

Each op has a PyTorch reference (``reference.py``), a Triton kernel and a C kernel. ``backend="torch"`` runs the
references; ``backend="triton"`` runs the Triton kernels, on CUDA or on the CPU under ``TRITON_INTERPRET=1``;
``backend="cpu"`` runs decode-into-attention, the OMP encoder and rotated values' codes through the C kernels
(``cpu_kernels.c``, compiled once per machine) and the Top-K encoder through its reference. Triton is imported
only when a Triton backend is asked for.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from . import cpu_kernels  # builds nothing until a kernel is first asked for
from .reference import (
    CompressedKV,
    apply_rope,
    decode_reference,
    omp_encode_reference,
    sparse_attention_reference,
    topk_encode_reference,
    undo_rope,
)

BACKENDS = ("auto", "torch", "triton", "cpu")

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


def resolve_backend(backend: str, device: torch.device, head_dim: int | None = None) -> str:
    """``auto`` takes Triton on CUDA tensors; on the CPU it takes the fused C kernels when they build here and fit
    ``head_dim``, else PyTorch (with a warning saying why). ``triton`` off CUDA needs TRITON_INTERPRET=1."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type != "cpu" or (head_dim is not None and not cpu_kernels.fits(head_dim)):
            return "torch"
        try:
            cpu_kernels.library()
        except cpu_kernels.CPUKernelUnavailable as error:
            _warn_once(f"sta_cache: the fused CPU kernels are unavailable, attending through PyTorch (slower): {error}")
            return "torch"
        return "cpu"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors runs only under the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton, or use backend='torch'"
        )
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on CPU tensors, the cache is on {device}")
        if head_dim is not None and not cpu_kernels.fits(head_dim):
            raise ValueError(
                f"backend='cpu' needs head_dim a multiple of 16 up to {cpu_kernels.MAX_HEAD_DIM}, the model has "
                f"{head_dim}"
            )
        try:
            cpu_kernels.library()  # build now: a failure is reported when the backend is resolved, not mid-generation
        except cpu_kernels.CPUKernelUnavailable as error:
            raise cpu_kernels.CPUKernelUnavailable(
                f"backend='cpu' needs the C kernels, which are unavailable here: {error}. Use backend='auto' (falls "
                "back to PyTorch) or backend='torch'"
            ) from error
    return backend


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def encode(
    x: torch.Tensor, sae: dict[str, torch.Tensor], k: int, encoder: str, backend: str, pursuit: str = "omp"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code ``x [M, d]`` with one SAE (``W_enc, b_enc, W_dec, b_dec``) -> ``(indices [M, k], coefficients [M, k])``.
    ``pursuit`` ("omp" or "mp") says how the "omp" encoder picks atoms (see ``reference.omp_encode_reference``)."""
    if backend == "triton":
        from . import triton_encode

        if encoder == "omp":
            return triton_encode.omp_encode(x, sae["W_dec"], sae["b_dec"], k, pursuit=pursuit)
        return triton_encode.topk_encode(x, sae["W_enc"], sae["b_enc"], sae["b_dec"], k)
    if encoder == "omp":
        if backend == "cpu":
            return cpu_kernels.omp_encode(x, sae["W_dec"], sae["b_dec"], k, pursuit=pursuit)
        return omp_encode_reference(x, sae["W_dec"], sae["b_dec"], k, pursuit=pursuit)
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
    if backend == "cpu":
        return cpu_kernels.sparse_attention(query, kv, mask, scaling, softcap)
    if kv.packed_index_bits or kv.key_levels is not None or kv.value_levels is not None:
        raise ValueError("only the 'cpu' backend reads bit-packed indices and coefficient levels; unpack them first")
    if backend == "triton":
        from . import triton_attention

        return triton_attention.sparse_attention(query, kv, mask, scaling, softcap)
    return sparse_attention_reference(query, kv, mask, scaling, softcap)
