"""Argument checks shared by the cache, its layers and the dictionary config.

A value of the wrong type or out of range is refused where it is given, with a message that says what was given,
what is valid and what to do, instead of failing later inside a kernel, mid-generation, or not at all (an int8
coefficient dtype or a float budget used to be accepted and degraded the model's output silently). Wrong types
raise ``TypeError``, wrong values ``ValueError``.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
from collections.abc import Sequence

import torch

from .configs import Pursuit, check_choice
from .kernels.dispatch import BACKENDS
from .packing import index_bits

# Coefficients are signed reals: floats that have a sign bit. None (the default) keeps the model's dtype.
COEFFICIENT_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
)
# unpack_indices reads three bytes per index, so a packed index holds at most 16 bits (N <= 65536 atoms).
MAX_PACKED_INDEX_BITS = 16


def check_int(name: str, value: object, *, minimum: int, maximum: int | None = None, bound: str = "") -> None:
    """``value`` must be an int in ``[minimum, maximum]`` (``bound`` says where the maximum comes from). A bool is
    not a count, so ``True`` is refused, and so is ``8.0``: a float budget or length is a mistake upstream."""
    valid = f"from {minimum} to {maximum}{bound}" if maximum is not None else f">= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int {valid}, got {value!r} ({type(value).__name__})")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an int {valid}, got {value}")


def per_layer_atoms(name: str, value: object, num_layers: int, n_atoms: int) -> tuple[int, ...]:
    """``k_key`` / ``k_value`` for each of a dictionary's ``num_layers`` layers: one int for all of them, or a
    sequence of one int per layer (in ``layer_indices`` order), each from 1 to ``n_atoms``."""
    bound = " (the dictionary's N atoms)"
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != num_layers:
            raise ValueError(
                f"{name} per layer needs one int for each of the dictionary's {num_layers} layers (in layer_indices "
                f"order), got {len(value)}"
            )
        for i, atoms in enumerate(value):
            check_int(f"{name}[{i}]", atoms, minimum=1, maximum=n_atoms, bound=bound)
        return tuple(int(atoms) for atoms in value)
    check_int(name, value, minimum=1, maximum=n_atoms, bound=bound + ", or a list of one per layer")
    return (int(value),) * num_layers


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_positive_float(name: str, value: object) -> None:
    """``value`` must be a finite number > 0 (an int is fine; a bool or the string "1.0" is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite positive number, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def check_backend(backend: object) -> None:
    """``backend`` must name kernels this machine can run. The device is the model's and is known only at the
    first forward; what is known now is checked now (Triton without CUDA or its interpreter)."""
    check_choice(
        "backend",
        backend,
        BACKENDS,
        hint=" (it names the kernels, not the device: the cache follows the model's device, and 'auto' takes Triton "
        "on CUDA and the C kernels, or PyTorch, on the CPU)",
    )
    if backend != "triton":
        return
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs a CUDA GPU and torch.cuda.is_available() is False: use backend='auto' (or "
            "'torch' / 'cpu') on the CPU, or set TRITON_INTERPRET=1 before importing triton to run the Triton "
            "kernels in its interpreter (slow; for tests)"
        )
    if importlib.util.find_spec("triton") is None:
        raise ValueError("backend='triton' needs the triton package: pip install triton, or use backend='auto'")


def check_coefficient_dtype(dtype: object) -> None:
    """``dtype`` must be ``None`` (the model's dtype) or one of :data:`COEFFICIENT_DTYPES`: integer and bool dtypes
    would truncate every coefficient. Strings are refused rather than guessed at: pass ``torch.float16``."""
    valid = ", ".join(str(d) for d in COEFFICIENT_DTYPES)
    if dtype is None or dtype in COEFFICIENT_DTYPES:
        return
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        fix = f": pass torch.{name}" if isinstance(getattr(torch, name, None), torch.dtype) else ""
        raise TypeError(f"coefficient_dtype must be a torch.dtype ({valid} or None), got the string {dtype!r}{fix}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"coefficient_dtype must be a torch.dtype ({valid} or None), got {dtype!r}")
    raise ValueError(
        f"coefficient_dtype {dtype} cannot hold signed real coefficients: use one of {valid}, or None for the "
        "model's dtype"
    )


def check_cache_arguments(
    *,
    n_atoms: int,
    num_layers: int | None = None,
    k_key: object,
    k_value: object,
    residual_length: object,
    num_sink_tokens: object,
    encode_batch: object,
    coefficient_dtype: object,
    pack_indices: object,
    backend: object,
    value_pursuit: object = "mp",
    coefficient_bits: object = None,
    value_bits: object = None,
) -> None:
    """The arguments of a :class:`SparseSemanticCache` (and of each of its layers), for a dictionary of
    ``n_atoms`` atoms. For a cache of ``num_layers`` dictionary layers ``k_key`` / ``k_value`` are one int for
    every layer or one per layer (:func:`per_layer_atoms`); for one layer (``num_layers`` None) an int.
    ``k_value`` is None exactly when ``value_bits`` codes the values."""
    kinds = ("k_key", k_key), ("k_value", k_value)
    for name, atoms in kinds if value_bits is None else kinds[:1]:
        if num_layers is None:
            check_int(name, atoms, minimum=1, maximum=n_atoms, bound=" (the dictionary's N atoms)")
        else:
            per_layer_atoms(name, atoms, num_layers, n_atoms)
    if value_bits is not None:
        check_int("value_bits", value_bits, minimum=2, maximum=8)
        if k_value is not None:
            raise ValueError(
                f"value_bits={value_bits} stores every coordinate of a rotated value, k_value={k_value} atoms per "
                "value: pass one of them"
            )
    check_int("residual_length", residual_length, minimum=0)
    check_int("num_sink_tokens", num_sink_tokens, minimum=0)
    check_int("encode_batch", encode_batch, minimum=1)
    check_coefficient_dtype(coefficient_dtype)
    if coefficient_bits is not None:
        check_int("coefficient_bits", coefficient_bits, minimum=2, maximum=8)
        if coefficient_dtype is not None:
            raise ValueError(
                f"coefficient_bits={coefficient_bits} stores coefficients as levels on a float8 scale, "
                f"coefficient_dtype={coefficient_dtype} as floats: pass one of them"
            )
    check_flag("pack_indices", pack_indices)
    if pack_indices and index_bits(n_atoms) > MAX_PACKED_INDEX_BITS:
        raise ValueError(
            f"pack_indices=True packs each atom index into at most {MAX_PACKED_INDEX_BITS} bits (N <= "
            f"{2**MAX_PACKED_INDEX_BITS} atoms); this dictionary has N={n_atoms} ({index_bits(n_atoms)}-bit "
            "indices): use pack_indices=False"
        )
    check_backend(backend)
    check_choice("value_pursuit", value_pursuit, Pursuit)
