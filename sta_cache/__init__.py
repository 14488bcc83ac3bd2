"""sta_cache: STA-Attention KV-cache compression for Hugging Face transformers.

Every cached key and value vector is stored as a few "semantic atoms" of a per-layer sparse dictionary: k atom
indices and k coefficients per head and token. Importing this package registers the ``"sta"`` attention
implementation with transformers (at once, or as soon as transformers' modelling code is imported: see
:mod:`sta_cache.registration`). The public names below are imported on first use, so ``import sta_cache`` and
``sta-cache --help`` stay instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .registration import register_when_transformers_loads

if TYPE_CHECKING:
    from .attention import ATTN_IMPLEMENTATION
    from .cache import SparseSemanticCache, UnsupportedModelError, check_model_fits
    from .compat import cache_kwargs
    from .dictionary import DictionaryFormatError, KVDictionary, KVDictionaryConfig
    from .layer import SparseSemanticLayer
    from .sae import TopKSAE

_HOMES = {
    "ATTN_IMPLEMENTATION": "attention",
    "DictionaryFormatError": "dictionary",
    "KVDictionary": "dictionary",
    "KVDictionaryConfig": "dictionary",
    "SparseSemanticCache": "cache",
    "SparseSemanticLayer": "layer",
    "TopKSAE": "sae",
    "UnsupportedModelError": "cache",
    "cache_kwargs": "compat",
    "check_model_fits": "cache",
}
__all__ = [
    "ATTN_IMPLEMENTATION",
    "DictionaryFormatError",
    "KVDictionary",
    "KVDictionaryConfig",
    "SparseSemanticCache",
    "SparseSemanticLayer",
    "TopKSAE",
    "UnsupportedModelError",
    "cache_kwargs",
    "check_model_fits",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'sta_cache' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


register_when_transformers_loads()
