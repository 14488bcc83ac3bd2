"""The keyword a transformers model takes its cache by: ``past_key_values`` up to transformers 5.23, ``cache``
from 5.24 (which still accepts ``past_key_values`` with a FutureWarning until its removal)."""

from __future__ import annotations

import inspect

import torch


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """``{"cache": cache}`` if ``model.forward`` takes ``cache``, else ``{"past_key_values": cache}``; pass it to
    ``model(...)`` or ``model.generate(...)`` to run on either side of the rename without warnings."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}
