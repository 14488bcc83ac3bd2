"""Launch helpers shared by the Triton kernels (triton_attention.py, triton_encode.py)."""

from __future__ import annotations

import torch

PROGRAMS_PER_SM = 4  # programs per streaming multiprocessor the kernels aim for on a GPU


def scratch(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Working memory the kernels fully overwrite before reading: NaN (or -1) poisoned off CUDA (the interpreter,
    i.e. tests), so that a read before a write shows up, and uninitialised on CUDA, where a fill costs bandwidth."""
    if device.type == "cuda":
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, device=device, dtype=dtype)


def target_programs(device: torch.device, interpreted: int) -> int:
    """How many programs a launch should aim for: a few per SM on a GPU, ``interpreted`` under the interpreter
    (where every program runs in Python: the fewest that still exercise the kernel's splitting)."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return interpreted
