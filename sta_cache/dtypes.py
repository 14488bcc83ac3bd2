"""Floating-point dtypes, and the coefficient storages of the cache, by the names that configs and command lines use
for them."""

from __future__ import annotations

import torch

# Saved dictionary weights (TrainConfig.dtype) and stored cache coefficients (`sta-cache eval --coefficient-dtypes`).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
# Stored cache coefficients as b-bit levels on a float8 scale per vector (SparseSemanticCache(coefficient_bits=b)).
LEVEL_NAMES: dict[str, int] = {f"int{bits}": bits for bits in range(2, 9)}
SHORT_NAMES = {  # for table rows
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float8_e4m3fn": "fp8",
    **{name: name for name in LEVEL_NAMES},
}


def coefficient_arguments(name: str | None) -> dict:
    """The SparseSemanticCache arguments that store coefficients as ``name`` (a DTYPES or LEVEL_NAMES name;
    None: the model's dtype)."""
    return {"coefficient_dtype": DTYPES.get(name), "coefficient_bits": LEVEL_NAMES.get(name)}


__all__ = ["DTYPES", "LEVEL_NAMES", "SHORT_NAMES", "coefficient_arguments"]
