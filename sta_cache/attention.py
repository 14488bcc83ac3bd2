"""The "sta" attention implementation: attends from the cache's codes without rebuilding compressed keys/values.

Importing ``sta_cache`` registers it, so ``from_pretrained(..., attn_implementation="sta")`` (or
``model.set_attn_implementation("sta")``) routes every attention layer here. Layers whose cache is dense (no
dictionary, sliding-window layers, no cache at all) go to PyTorch's sdpa unchanged.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kernels import dispatch
from .layer import SparseSemanticLayer

ATTN_IMPLEMENTATION = "sta"

# transformers calls ``cache.update(...)`` and then the attention function of the same layer, and does not hand
# the cache to the attention function; the cache leaves the layer it just updated here for the next call to take.
_handoff = threading.local()

# From this many query tokens per step (chunked prefill, long speculative drafts) rebuilding the compressed tokens
# and running sdpa costs less than attending from the codes: the rebuild is paid once per step while the codes'
# cost grows with every query (LAB_NOTES.md has the measurements). Decode steps always read the codes.
DENSE_FROM_QUERIES = 32


def hand_over(layer_idx: int, layer: object) -> None:
    """Called by ``SparseSemanticCache.update``: the layer that the next attention call of ``layer_idx`` reads."""
    _handoff.entry = (layer_idx, layer)


def _take(layer_idx: int | None) -> SparseSemanticLayer | None:
    entry = getattr(_handoff, "entry", None)
    _handoff.entry = None
    if entry is None or entry[0] != layer_idx or not isinstance(entry[1], SparseSemanticLayer):
        return None
    return entry[1]


def sta_mask(*args, **kwargs) -> torch.Tensor | None:
    """The boolean sdpa mask, always materialised: the "sta" path reads padding from it."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


class _MaskVerdict:
    """A yes/no answer about a mask, computed once per mask tensor and argument: every layer of a forward gets the
    same mask tensor, so the answer is kept for the last (mask, argument) seen, per thread. A weak reference tells a
    later mask from this one."""

    def __init__(self, compute: Callable[[torch.Tensor, int], bool]):
        self.compute = compute
        self.last = threading.local()

    def __call__(self, mask: torch.Tensor, argument: int = 0) -> bool:
        entry = getattr(self.last, "entry", None)
        if entry is not None and entry[0]() is mask and entry[1] == argument:
            return entry[2]
        verdict = self.compute(mask, argument)
        self.last.entry = (weakref.ref(mask), argument, verdict)
        return verdict


def _plain_causal(mask: torch.Tensor, _: int) -> bool:
    """Whether a bool mask ``[B, 1 or H, L, L]`` is exactly lower-triangular in every row (no padding, no
    bidirectional spans), i.e. what ``is_causal=True`` computes (the comparison reads the whole ``L x L`` mask)."""
    size = mask.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=mask.device).tril_()
    return bool((mask == causal).all())


def _visible(mask: torch.Tensor, length: int) -> bool:
    """Whether every query of ``mask [B, 1 or H, q, >= length]`` may attend to all of its last ``length`` slots
    (a decode step without padding): then the "sta" path needs no mask and every new token is real."""
    visible = mask[..., -length:]
    if visible.dtype != torch.bool:
        visible = visible > torch.finfo(visible.dtype).min / 2
    return bool(visible.all())


_is_plain_causal = _MaskVerdict(_plain_causal)
_all_visible = _MaskVerdict(_visible)


def sta_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over ``sinks | codes | window`` of the layer the cache just updated. Returns ``[B, Lq, Hq, d]``."""
    layer = _take(getattr(module, "layer_idx", None))
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, softcap=softcap, **kwargs
        )
    if module.training and dropout > 0:
        raise ValueError("the 'sta' attention path is for inference; it does not implement attention dropout")
    batch, _, q_len, head_dim = query.shape
    length = layer.get_seq_length()
    mask = None
    if attention_mask is not None and not _all_visible(attention_mask, length):
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        mask = attention_mask[:, 0, :, -length:].expand(batch, q_len, length)
    real = None
    if mask is not None:
        new = torch.arange(q_len, device=mask.device)
        real = mask[:, new, length - q_len + new]
    layer.observe(kwargs.get("position_ids"), real)
    layer.attention_reads_codes = True
    dense_is_cheaper = layer.num_compressed == 0 or q_len >= DENSE_FROM_QUERIES
    if dense_is_cheaper and softcap is None and (mask is not None or q_len == 1):
        # Nothing coded yet (a prefill), or enough queries to amortise rebuilding the codes: sdpa over dense keys
        # is the same attention, with PyTorch's fused kernels instead of materialised scores. (Without a mask,
        # sdpa would align a causal chunk to the start of the keys, so masked chunks only.)
        keys, values = layer.dense_keys_values()
        dense_mask = None if attention_mask is None else attention_mask[..., -length:]
        if dense_mask is not None and attention_mask.shape[-1] == length == q_len and _is_plain_causal(attention_mask):
            dense_mask = None  # a prefill without padding: sdpa's causal kernel, not a materialised mask
        out, _ = sdpa_attention_forward(
            module, query, keys, values, dense_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    else:
        scaling = head_dim**-0.5 if scaling is None else scaling
        view = layer.compressed_view(packed=layer.backend == "cpu")
        out = dispatch.sparse_attention(query, view, mask, scaling, softcap, layer.backend).transpose(1, 2)
    # Encode on append: this layer's attention has read the new tokens densely, so what left the window can be
    # coded now, before the next layer runs; a prefill never holds more than one layer's dense prompt.
    layer.flush(min_tokens=layer.encode_batch)
    return out.contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, sta_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sta_mask)
