"""What the quantizer baselines share with SparseSemanticCache: dense sinks, a dense recent window, and the tokens
in between stored compressed, in a transformers ``Cache``.

Slots are ordered ``sinks | compressed | window`` as in :class:`~sta_cache.layer.SparseSemanticLayer`: the first
``num_sink_tokens`` tokens settle as dense sinks once the window first overflows; a token leaves the
``residual_length``-token window at the start of a later ``update`` (so the step that wrote it attends to it
exactly), ``flush_tokens`` or more at a time and always a multiple of ``group`` (a quantizer that groups tokens,
as KIVI's keys, compresses whole groups only). Attention gets every token back densely: the compressed part is
dequantized on every step from what is stored (no dense copy is kept). Slot ``i`` is position ``i``: batches
without left padding, as the other attention implementations than "sta" assume for SparseSemanticCache.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .. import geometry
from ..cache import CompactSlidingWindowLayer
from ..memory import owned, storage_bytes

__all__ = ["WindowedQuantizedCache", "WindowedQuantizedLayer"]

Stored = dict[str, torch.Tensor]  # a compressed block: named tensors whose dim 2 runs over tokens (or token groups)
KINDS = ("key", "value")


class WindowedQuantizedLayer(CacheLayerMixin):
    """One attention layer's cache: subclasses say how a block of tokens is stored (:meth:`quantize`) and read back
    (:meth:`dequantize`), and which shared tensors they hold (:meth:`fixed_tensors`: rotations, codebooks)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, *, residual_length: int, num_sink_tokens: int, flush_tokens: int, group: int = 1):
        super().__init__()
        if residual_length < 0 or num_sink_tokens < 0 or flush_tokens < 1 or group < 1:
            raise ValueError(
                f"need residual_length >= 0, num_sink_tokens >= 0, flush_tokens >= 1 and group >= 1; got "
                f"{residual_length}, {num_sink_tokens}, {flush_tokens}, {group}"
            )
        self.residual_length, self.num_sink_tokens = residual_length, num_sink_tokens
        self.flush_tokens, self.group = flush_tokens, group
        self._clear()

    @abstractmethod
    def quantize(self, kind: str, states: torch.Tensor) -> Stored:
        """Store ``states [B, H, n, d]`` (n a multiple of ``group``) of ``kind`` ("key" or "value")."""

    @abstractmethod
    def dequantize(self, kind: str, stored: Stored) -> torch.Tensor:
        """The ``[B, H, n, d]`` float32 states that ``stored`` (blocks of :meth:`quantize` joined on dim 2) holds."""

    @abstractmethod
    def fixed_tensors(self) -> list[torch.Tensor]:
        """Tensors the layer holds whatever the context (rotations, codebooks): a fixed cost, counted apart."""

    # ------------------------------------------------------------------------------------------ state
    def _clear(self) -> None:
        self.keys = self.values = None  # the window
        self.sink_keys = self.sink_values = None
        self.stored: dict[str, Stored] = {kind: {} for kind in KINDS}
        self.num_compressed = 0
        self.sinks_settled = False
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states.new_empty(batch, heads, 0, head_dim)  # not a view: it would hold the prompt's storage
        self.keys = self.values = self.sink_keys = self.sink_values = empty
        self.is_initialized = True

    @property
    def num_sinks(self) -> int:
        return 0 if self.sink_keys is None else self.sink_keys.shape[2]

    @property
    def num_window(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    # ------------------------------------------------------------------------------------ the protocol
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress what has left the window, append the new tokens densely, return all keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.flush(self.flush_tokens)
        if self.num_window == 0:
            self.keys, self.values = owned(key_states), owned(value_states)
        else:
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
        return self.dense_keys_values()

    def flush(self, min_tokens: int = 1) -> None:
        """Settle the sinks once the window overflows, then compress the tokens beyond the window (whole groups)
        if there are at least ``min_tokens`` of them."""
        if not self.is_initialized or self.num_window <= self.residual_length:
            return
        if not self.sinks_settled:
            sinks = min(self.num_sink_tokens, self.num_window)
            self.sink_keys, self.keys = owned(self.keys[:, :, :sinks]), self.keys[:, :, sinks:]
            self.sink_values, self.values = owned(self.values[:, :, :sinks]), self.values[:, :, sinks:]
            self.sinks_settled = True
        overflow = self.num_window - self.residual_length
        overflow -= overflow % self.group
        if overflow <= 0 or overflow < min_tokens:
            return
        for kind, states in (("key", self.keys[:, :, :overflow]), ("value", self.values[:, :, :overflow])):
            block = self.quantize(kind, states)
            old = self.stored[kind]
            self.stored[kind] = {name: torch.cat([old[name], t], dim=2) if old else t for name, t in block.items()}
        self.keys, self.values = owned(self.keys[:, :, overflow:]), owned(self.values[:, :, overflow:])
        self.num_compressed += overflow

    def dense_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys and values: sinks, the compressed tokens dequantized, the window."""
        if self.num_compressed == 0:
            return torch.cat([self.sink_keys, self.keys], dim=2), torch.cat([self.sink_values, self.values], dim=2)
        keys = self.dequantize("key", self.stored["key"]).to(self.dtype)
        values = self.dequantize("value", self.stored["value"]).to(self.dtype)
        return (
            torch.cat([self.sink_keys, keys, self.keys], dim=2),
            torch.cat([self.sink_values, values, self.values], dim=2),
        )

    def get_seq_length(self) -> int:
        return self.num_sinks + self.num_compressed + self.num_window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.stored = {kind: {name: fn(t) for name, t in block.items()} for kind, block in self.stored.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    # ---------------------------------------------------------------------------------------- accounting
    def memory(self) -> dict[str, int]:
        """Bytes held, counted from storages (each once): ``code_bytes`` (every stored tensor of the compressed
        tokens: packed codes, scales, norms) and ``dense_bytes`` (sinks and window)."""
        seen: set = set()
        return {
            "code_bytes": storage_bytes(self.stored, seen),
            "dense_bytes": storage_bytes([self.sink_keys, self.sink_values, self.keys, self.values], seen),
        }


class WindowedQuantizedCache(Cache):
    """A ``Cache`` of :class:`WindowedQuantizedLayer` (made by ``make_layer(layer_idx)``) for full-attention
    layers; sliding-window layers keep transformers' bounded dense cache, as in SparseSemanticCache."""

    def __init__(self, make_layer: Callable[[int], WindowedQuantizedLayer], config: PretrainedConfig):
        text_config = config.get_text_config()
        layers = []
        for i, layer_type in enumerate(geometry.layer_types(text_config)):
            if layer_type == "sliding_attention":
                layers.append(CompactSlidingWindowLayer(sliding_window=text_config.sliding_window))
            elif layer_type == "chunked_attention":
                layers.append(CompactSlidingWindowLayer(sliding_window=text_config.attention_chunk_size))
            elif layer_type == geometry.FULL_ATTENTION:
                layers.append(make_layer(i))
            else:
                layers.append(DynamicLayer())
        super().__init__(layers=layers)

    @property
    def quantized_layers(self) -> list[WindowedQuantizedLayer]:
        return [layer for layer in self.layers if isinstance(layer, WindowedQuantizedLayer)]

    def flush(self) -> None:
        """Compress every whole group of tokens that has left its layer's window (otherwise done at the next
        update)."""
        for layer in self.quantized_layers:
            layer.flush()

    def memory_footprint(self) -> dict[str, int]:
        """``code_bytes`` and ``dense_bytes`` of every layer after :meth:`flush`, and ``dictionary_bytes``: the
        layers' fixed tensors (rotations, codebooks), each storage once."""
        self.flush()
        code = dense = 0
        for layer in self.layers:
            if isinstance(layer, WindowedQuantizedLayer):
                memory = layer.memory()
                code, dense = code + memory["code_bytes"], dense + memory["dense_bytes"]
            elif layer.is_initialized and layer.keys is not None:
                dense += storage_bytes([layer.keys, layer.values])
        fixed = storage_bytes([layer.fixed_tensors() for layer in self.quantized_layers])
        return {"code_bytes": code, "dense_bytes": dense, "dictionary_bytes": fixed}
