"""Where ``sta-cache eval`` lived before :mod:`sta_cache.evaluation`: benchmark scripts still import
:func:`cache_bytes` from here."""

from __future__ import annotations

from .evaluation.bytes import cache_bytes

__all__ = ["cache_bytes"]
