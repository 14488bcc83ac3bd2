"""Measure how much each layer's keys and values cost the model when coded with few atoms
(:class:`~sta_cache.allocation.LayerSensitivity`, what per-layer budgets are allocated by).

The cost is the KL divergence of the model's next-token predictions from DynamicCache's when only one layer's keys
(or values) are coded at k atoms, the other kind at full rank, fed in chunks as the eval feeds a cache.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..allocation import LayerSensitivity
from ..cache import SparseSemanticCache
from ..compat import cache_kwargs
from ..dictionary import KINDS, KVDictionary

__all__ = ["measure_sensitivity"]


@torch.no_grad()
def measure_sensitivity(
    model,
    dictionary: KVDictionary,
    texts: Iterable[torch.Tensor],
    *,
    atoms: tuple[int, ...],
    prefill: int = 256,
    chunk: int = 64,
    cache_arguments: dict | None = None,
    measured_on: str = "",
    progress: bool = True,
) -> LayerSensitivity:
    """Measure :class:`LayerSensitivity` on ``texts`` (``[T]`` token ids each): a prefill of ``prefill`` tokens,
    then chunks of ``chunk``, scoring every prediction after the prefill. One run per layer, kind and entry of
    ``atoms``; the kind not measured is coded at full rank (head_dim atoms), so what is measured is the kind's own
    loss. ``cache_arguments`` go to each SparseSemanticCache (window, sinks); the codes keep the model's dtype."""
    texts = [ids.reshape(1, -1).to(model.device) for ids in texts]
    if not texts or any(ids.shape[1] <= prefill for ids in texts):
        raise ValueError(f"sensitivity needs texts longer than the prefill of {prefill} tokens")
    meta = dictionary.config
    full = min(meta.head_dim, meta.n_atoms)

    def log_probs(make_cache: Callable) -> list[torch.Tensor]:
        out = []
        for ids in texts:
            cache = make_cache()
            logits = [model(ids[:, :prefill], **cache_kwargs(model, cache)).logits[:, -1:]]
            for start in range(prefill, ids.shape[1] - 1, chunk):
                logits.append(model(ids[:, start : start + chunk], **cache_kwargs(model, cache)).logits)
            out.append(torch.cat(logits, dim=1)[0, : ids.shape[1] - prefill].float().log_softmax(-1))
        return out

    def one_layer_coded(layer_idx: int, k_key: int, k_value: int) -> Callable:
        def make():
            cache = SparseSemanticCache(
                dictionary, config=model.config, k_key=k_key, k_value=k_value, **(cache_arguments or {})
            )
            for i in dictionary.config.layer_indices:
                if i != layer_idx:
                    cache.layers[i] = DynamicLayer()
            return cache

        return make

    with warnings.catch_warnings():  # full-rank codes outweigh the dense vectors they stand for: expected here
        warnings.filterwarnings("ignore", message="SparseSemanticCache with k_key", category=UserWarning)
        reference = log_probs(DynamicCache)
        scored = sum(r.shape[0] for r in reference)
        kl = {kind: [] for kind in KINDS}
        bar = tqdm(
            total=len(meta.layer_indices) * len(KINDS) * len(atoms), desc="layer sensitivity", disable=not progress
        )
        for layer_idx in meta.layer_indices:
            for kind in KINDS:
                row = []
                for k in atoms:
                    k_key, k_value = (min(k, meta.n_atoms), full) if kind == "key" else (full, min(k, meta.n_atoms))
                    coded = log_probs(one_layer_coded(layer_idx, k_key, k_value))
                    divergence = sum((r.exp() * (r - c)).sum().item() for r, c in zip(reference, coded, strict=True))
                    row.append(max(divergence / scored, 0.0))
                    bar.update()
                kl[kind].append(tuple(row))
        bar.close()
    return LayerSensitivity(tuple(atoms), kl, measured_on)
