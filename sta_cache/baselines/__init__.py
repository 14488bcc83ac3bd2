"""Training-free KV-cache quantizers that ``sta-cache eval`` compares SparseSemanticCache with, each a transformers
``Cache`` with the same dense sinks and recent window as ours (:mod:`.window`):

* :class:`RotatedQuantizedCache` (:mod:`.rotated`): random rotation + Lloyd-Max scalar codebook + float16 norm,
  TurboQuant / PolarQuant style, at fractional bits per coordinate (:mod:`sta_cache.lloyd_max`);
* :class:`KiviCache` (:mod:`.kivi`): KIVI's per-channel keys / per-token values, asymmetric min/max.
"""

from __future__ import annotations

from .kivi import KiviCache
from .rotated import RotatedQuantizedCache
from .window import WindowedQuantizedCache, WindowedQuantizedLayer

__all__ = ["KiviCache", "RotatedQuantizedCache", "WindowedQuantizedCache", "WindowedQuantizedLayer"]
