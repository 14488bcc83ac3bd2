"""sta_cache: STA-Attention KV-cache compression for Hugging Face transformers.

Every cached key and value vector is stored as a few "semantic atoms" of a per-layer Top-K sparse autoencoder:
k atom indices and k coefficients per head and token. Importing this package registers the ``"sta"``
attention implementation.
"""

from .attention import ATTN_IMPLEMENTATION
from .cache import SparseSemanticCache, UnsupportedModelError, check_model_fits
from .compat import cache_kwargs
from .dictionary import DictionaryFormatError, KVDictionary, KVDictionaryConfig
from .layer import SparseSemanticLayer
from .sae import TopKSAE

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
