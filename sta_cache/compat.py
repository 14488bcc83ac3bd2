"""The keyword a transformers model takes its cache by: ``past_key_values`` up to transformers 5.23, ``cache``
from 5.24 (which still accepts ``past_key_values`` with a FutureWarning until its removal)."""

from __future__ import annotations

import functools
import inspect

import torch


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """Looked up once per model class: callers pass the cache on every decode step."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """``{"cache": cache}`` if ``model.forward`` takes ``cache``, else ``{"past_key_values": cache}``; pass it to
    ``model(...)`` or ``model.generate(...)`` to run on either side of the rename without warnings."""
    return {_cache_keyword(type(model)): cache}
