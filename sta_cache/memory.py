"""Byte accounting: what tensors really hold in memory.

A view keeps its whole storage alive (a slice of the prompt's keys holds every prompt token), so memory is counted
from storages, each once (``untyped_storage().nbytes()``), never from ``numel()`` of the tensors at hand.
"""

from __future__ import annotations

import torch


def storage_bytes(obj, seen: set | None = None) -> int:
    """Bytes of every distinct storage reachable from ``obj`` (tensors, tuples/lists, dicts), each counted once
    (pass the same ``seen`` set to several calls to count storages shared between them once overall).

    Tensor subclasses that wrap other tensors (optimum-quanto's ``QTensor``s: packed data, scales, shifts) are
    opened with ``__tensor_flatten__``, so packed 4-/2-bit data counts as the ``uint8`` bytes that hold it.
    """
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if (
            type(obj) is not torch.Tensor
            and not isinstance(obj, torch.nn.Parameter)
            and hasattr(obj, "__tensor_flatten__")
        ):
            names, _ = obj.__tensor_flatten__()
            return sum(storage_bytes(getattr(obj, name), seen) for name in names)
        storage = obj.untyped_storage()
        key = (obj.device, storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(storage_bytes(item, seen) for item in obj)
    if isinstance(obj, dict):
        return sum(storage_bytes(item, seen) for item in obj.values())
    return 0


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if it is all of its storage, else a compact copy: a view kept for long (the sinks cut from
    a prompt, a window after encoding) must not keep the larger storage it was cut from alive."""
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)
