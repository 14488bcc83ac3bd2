"""Stream the keys and values that a model writes into its cache over a text, for training dictionaries.

The model runs on windows of ``context`` tokens (no padding, positions ``0 .. context-1``) with a
:class:`RecordingCache`; each forward hands every layer's key/value states to a callback and the cache is dropped
afterwards, so memory stays bounded by one forward whatever the length of the text. Keys can be un-rotated to
their pre-RoPE form with the layer's own rotary frequencies (checked once against the model, see
:func:`verify_rotary`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PretrainedConfig

from .compat import cache_kwargs
from .configs import KeySpace, check_choice
from .geometry import SLIDING_LAYER_TYPES, compressible_layers
from .kernels.reference import apply_rope, undo_rope
from .text import TextSource

__all__ = [
    "KVBatch",
    "RecordingCache",
    "heldout_sequence",
    "iter_kv",
    "rotary_for_layer",
    "token_windows",
    "verify_rotary",
]


class _StopForward(Exception):
    """Raised by the recording cache once the last layer of interest has been recorded: skips the rest."""


# ----------------------------------------------------------------------------------------------------- modules
def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def _attention_module(model: torch.nn.Module, layer_idx: int) -> torch.nn.Module | None:
    layers = getattr(_decoder(model), "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return getattr(layer, "self_attn", None) or getattr(layer, "attention", None)


def rotary_for_layer(model: torch.nn.Module, layer_idx: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim/2] float32, attention_scaling)`` of the rotary embedding that ``layer_idx`` uses.

    Looks for a rotary module on the layer's attention first, then in the decoder (``rotary_emb`` and friends):
    Llama-style modules keep ``inv_freq`` / ``attention_scaling``; Gemma-3-style ones keep
    ``{layer_type}_inv_freq`` / ``{layer_type}_attention_scaling`` per attention type.
    """
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    layer_type = layer_types[layer_idx] if layer_types else None
    candidates: list[torch.nn.Module] = []
    attention = _attention_module(model, layer_idx)
    if attention is not None:
        candidates += [m for name, m in attention.named_children() if "rotary" in name]
    decoder = _decoder(model)
    named = list(decoder.named_modules())
    if layer_type in SLIDING_LAYER_TYPES:  # older Gemma-3 layouts kept a separate local rotary module
        candidates += [m for name, m in named if name.endswith("rotary_emb_local")]
    candidates += [m for name, m in named if name.endswith("rotary_emb")]
    candidates += [m for name, m in named if "rotary" in name.rsplit(".", 1)[-1]]
    candidates += [
        m
        for _, m in named
        if hasattr(m, "inv_freq") or any(n.endswith("_inv_freq") for n, _ in m.named_buffers(recurse=False))
    ]
    for module in candidates:
        if layer_type is not None and isinstance(getattr(module, f"{layer_type}_inv_freq", None), torch.Tensor):
            inv_freq = getattr(module, f"{layer_type}_inv_freq")
            scaling = getattr(module, f"{layer_type}_attention_scaling", 1.0)
        elif isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            inv_freq, scaling = module.inv_freq, getattr(module, "attention_scaling", 1.0)
        else:
            continue
        return inv_freq.detach().float().cpu().clone(), float(scaling)
    raise ValueError(
        f"could not find the rotary embedding of layer {layer_idx} ({type(model).__name__}): pre-RoPE keys need "
        "a rotary module with `inv_freq` (or `{layer_type}_inv_freq`)"
    )


# ----------------------------------------------------------------------------------------------------- text
def _prefix_ids(tokenizer) -> list[int]:
    """The special tokens that the tokenizer puts in front of a text (e.g. BOS), or []."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    if len(full) > len(plain) and full[len(full) - len(plain) :] == plain:
        return list(full[: len(full) - len(plain)])
    return []


def token_windows(
    tokenizer,
    text: TextSource | str | os.PathLike,
    context: int,
    n_windows: int,
    *,
    skip_windows: int = 0,
) -> torch.LongTensor:
    """Windows ``[n, context]`` of consecutive token ids from a text file or :class:`~sta_cache.text.TextSource`,
    each starting with the tokenizer's special prefix (e.g. BOS) if it adds one. Windows ``skip_windows ..`` are
    returned, so two calls with disjoint ranges give disjoint text. The text is read in blocks (never all at once)
    until enough tokens are found; fewer windows are returned if the text runs out."""
    prefix = _prefix_ids(tokenizer)
    body = context - len(prefix)
    if body < 1:
        raise ValueError(f"context={context} is too short")
    needed = (skip_windows + n_windows) * body
    ids: list[int] = []
    for block in TextSource.of(text).blocks():
        ids += tokenizer(block, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= needed:
            break
    ids = ids[skip_windows * body : needed]
    count = len(ids) // body
    if count == 0:
        return torch.zeros(0, context, dtype=torch.long)
    windows = torch.tensor(ids[: count * body], dtype=torch.long).view(count, body)
    if prefix:
        windows = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(count, -1), windows], dim=1)
    return windows


def heldout_sequence(
    tokenizer, text: TextSource | str | os.PathLike, length: int, after_windows: int, context: int
) -> torch.LongTensor:
    """``[1, <= length]`` consecutive token ids of the text that follows its first ``after_windows`` windows of
    ``context`` tokens (the training text), starting with the tokenizer's special prefix; empty if the text ends
    first."""
    prefix = len(_prefix_ids(tokenizer))
    skip = -(
        -after_windows * (context - prefix) // (length - prefix)
    )  # whole windows of `length` past the training text
    return token_windows(tokenizer, text, length, 1, skip_windows=skip)


# ----------------------------------------------------------------------------------------------------- recording
class RecordingCache(DynamicCache):
    """A ``DynamicCache`` that hands each layer's new (post-RoPE) key/value states ``[B, H, C, d]`` to
    ``callback(layer_idx, keys, values)``. Use one per forward and drop it: it holds one forward's states only.
    After the callback for ``stop_after`` it aborts the forward (the later layers and the LM head are not needed);
    :func:`iter_kv` catches that."""

    def __init__(
        self,
        config: PretrainedConfig,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None],
        stop_after: int | None = None,
    ):
        super().__init__(config=config)
        self.callback = callback
        self.stop_after = stop_after

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.callback(layer_idx, key_states, value_states)
        if self.stop_after is not None and layer_idx >= self.stop_after:
            raise _StopForward
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def record_forward(
    model, input_ids: torch.LongTensor, layers: list[int]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``input_ids [B, C]`` (positions ``0..C-1``) and return ``{layer: (keys, values)}``, each
    ``[B, H, C, d]`` post-RoPE as the model cached them."""
    wanted = set(layers)
    states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def callback(layer_idx, keys, values):
        if layer_idx in wanted:
            states[layer_idx] = (keys.detach(), values.detach())

    cache = RecordingCache(model.config, callback, stop_after=max(layers))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            model(input_ids=input_ids.to(device), **cache_kwargs(model, cache), use_cache=True)
    except _StopForward:
        pass
    missing = wanted - set(states)
    if missing:
        raise RuntimeError(f"the model never wrote layers {sorted(missing)} into its cache")
    return states


@torch.no_grad()
def verify_rotary(
    model,
    input_ids: torch.LongTensor,
    layers: list[int],
    rotary: dict[int, tuple[torch.Tensor, float]],
    rtol: float = 1e-4,
    ptol: float = 1e-3,
) -> None:
    """Check on a real forward that our RoPE is the model's: ``apply_rope(undo_rope(k)) == k`` for the cached
    keys, and, where the attention module exposes ``k_proj`` (and ``k_norm``), that ``undo_rope(k)`` equals the
    projected keys before rotation. Raises ``AssertionError`` naming the layer otherwise."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i in layers:
        attention = _attention_module(model, i)
        k_proj = getattr(attention, "k_proj", None) if attention is not None else None
        if isinstance(k_proj, torch.nn.Module):
            handles.append(k_proj.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out.detach())))
    try:
        states = record_forward(model, input_ids, layers)
    finally:
        for handle in handles:
            handle.remove()
    b, c = input_ids.shape
    positions = torch.arange(c).expand(b, c)
    for i in layers:
        keys = states[i][0].float().cpu()
        inv_freq, scaling = rotary[i]
        unrotated = undo_rope(keys, positions, inv_freq, scaling)
        again = apply_rope(unrotated, positions, inv_freq, scaling)
        scale = keys.abs().max().clamp_min(1e-6)
        error = ((again - keys).abs().max() / scale).item()
        assert error < rtol, f"layer {i}: apply_rope(undo_rope(k)) differs from k by {error:.2e} (relative)"
        if i in captured:
            error = _projection_error(_attention_module(model, i), captured[i], unrotated)
            assert error < ptol, (
                f"layer {i}: un-rotating the cached keys with the rotary frequencies found for this layer does not "
                f"give the model's pre-RoPE keys (relative error {error:.2e}); the model's RoPE is not plain "
                "rotate-half RoPE with these frequencies"
            )


def _projection_error(attention: torch.nn.Module, projected: torch.Tensor, unrotated: torch.Tensor) -> float:
    """Relative max difference between un-rotated cached keys ``[B, H, C, d]`` and the ``k_proj`` output
    (passed through ``k_norm`` the way the module applies it: per head or over the whole projection)."""
    b, h, c, d = unrotated.shape
    k_norm = getattr(attention, "k_norm", None)
    if isinstance(k_norm, torch.nn.Module):
        weight = getattr(k_norm, "weight", None)
        if weight is not None and weight.numel() == h * d and h > 1:
            projected = k_norm(projected)
            k_norm = None
    projected = projected.view(b, c, h, d)
    if isinstance(k_norm, torch.nn.Module):
        projected = k_norm(projected)
    projected = projected.float().cpu().transpose(1, 2)
    return ((unrotated - projected).abs().max() / projected.abs().max().clamp_min(1e-6)).item()


@dataclass
class KVBatch:
    """The vectors of one forward: ``keys[layer]`` / ``values[layer]`` are float32 ``[Hd, n, d]`` with ``Hd`` 1
    (all KV heads pooled, for shared dictionaries) or the number of KV heads (``per_head``); ``tokens`` counts the
    token positions the forward covered (including skipped sink positions)."""

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    tokens: int


def _flatten(x: torch.Tensor, skip_first: int, per_head: bool) -> torch.Tensor:
    """``[B, H, C, d]`` -> ``[Hd, n, d]`` float32 without the first ``skip_first`` positions of each window."""
    x = x[:, :, skip_first:].float()
    b, h, c, d = x.shape
    if per_head:
        return x.permute(1, 0, 2, 3).reshape(h, b * c, d).contiguous()
    return x.permute(0, 2, 1, 3).reshape(1, b * c * h, d).contiguous()


def iter_kv(
    model,
    windows: torch.LongTensor,
    *,
    layers: list[int] | None = None,
    key_space: KeySpace = "post_rope",
    per_head: bool = False,
    batch_windows: int = 4,
    skip_first: int = 0,
    verify: bool = True,
) -> Iterator[KVBatch]:
    """Stream the cached keys/values of ``model`` over ``windows [n, C]``, ``batch_windows`` windows per forward.

    ``key_space="pre_rope"`` un-rotates keys by their positions with :func:`rotary_for_layer` (verified once on
    the first forward with :func:`verify_rotary`). ``skip_first`` drops the first positions of every window
    (attention sinks, which the cache keeps dense). Each yielded :class:`KVBatch` is independent of the model's
    state; nothing is kept between forwards.
    """
    check_choice("key_space", key_space, KeySpace)
    layers = list(layers) if layers is not None else compressible_layers(model.config)
    if not layers:
        raise ValueError("no layers to record")
    rotary = {i: rotary_for_layer(model, i) for i in layers} if key_space == "pre_rope" else {}
    if not 0 <= skip_first < windows.shape[1]:
        raise ValueError(f"skip_first={skip_first} must be below the window length {windows.shape[1]}")
    for start in range(0, windows.shape[0], batch_windows):
        ids = windows[start : start + batch_windows]
        if verify and rotary:
            verify_rotary(model, ids[:1], layers, rotary)
            verify = False
        states = record_forward(model, ids, layers)
        b, c = ids.shape
        keys, values = {}, {}
        for i in layers:
            k, v = states[i]
            if rotary:
                inv_freq, scaling = rotary[i]
                k = undo_rope(k.float().cpu(), torch.arange(c).expand(b, c), inv_freq, scaling)
            keys[i] = _flatten(k.cpu(), skip_first, per_head)
            values[i] = _flatten(v.cpu(), skip_first, per_head)
        yield KVBatch(keys, values, tokens=b * c)
