"""The shape of a model's key/value cache, read from its transformers config: layer types, KV heads, head_dim.

The cache (which layers get codes, what a dictionary must match) and the key/value collection for training both
read these; one definition keeps them agreeing on which layers are compressible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

FULL_ATTENTION = "full_attention"
# Layers that keep a bounded dense cache of their own and get no dictionary.
SLIDING_LAYER_TYPES = ("sliding_attention", "chunked_attention")

__all__ = [
    "FULL_ATTENTION",
    "SLIDING_LAYER_TYPES",
    "compressible_layers",
    "head_dim",
    "kv_geometry",
    "layer_types",
    "num_kv_heads",
]


def num_kv_heads(config: PretrainedConfig) -> int:
    """Key/value heads of a text config (all attention heads for a model without grouped-query attention)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config: PretrainedConfig) -> int:
    """Size of one head's key/value vector of a text config."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_types(config: PretrainedConfig) -> list[str]:
    """The attention type of every layer of a text config (all full attention where the config names none)."""
    return list(getattr(config, "layer_types", None) or [FULL_ATTENTION] * config.num_hidden_layers)


def kv_geometry(config: PretrainedConfig) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a model's text config."""
    config = config.get_text_config()
    return config.num_hidden_layers, num_kv_heads(config), head_dim(config)


def compressible_layers(config: PretrainedConfig) -> list[int]:
    """The layers that get dictionaries: every layer but sliding-window / chunked ones (which keep a bounded
    dense cache)."""
    return [i for i, t in enumerate(layer_types(config.get_text_config())) if t not in SLIDING_LAYER_TYPES]
