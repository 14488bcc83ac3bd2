"""Floating-point dtypes by the names that configs and command lines use for them."""

from __future__ import annotations

import torch

# Saved dictionary weights (TrainConfig.dtype) and stored cache coefficients (`sta-cache eval --coefficient-dtypes`).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
SHORT_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "fp8"}  # for table rows

__all__ = ["DTYPES", "SHORT_NAMES"]
