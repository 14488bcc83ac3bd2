"""The held-out check that ends every training run and goes into the dictionary's model card: reconstruction
cosine per layer and kind, and the perplexity ratio of the cache at the trained budget against DynamicCache."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..cache import SparseSemanticCache
from ..collect import iter_kv
from ..configs import DEFAULT_SINKS, TrainConfig
from ..dictionary import KVDictionary
from .heldout import evaluate_dictionary, summary

WINDOW = 64  # the cache's dense recent window in the perplexity check, as in `sta-cache eval`
PREFILL, CHUNK = 256, 32  # fed as generation feeds a cache: a prefill, then chunks (`sta-cache eval` defaults)

__all__ = ["heldout_quality"]


@torch.no_grad()
def heldout_quality(
    model,
    dictionary: KVDictionary,
    eval_windows: torch.Tensor,
    sequence: torch.Tensor,
    config: TrainConfig,
    *,
    progress: bool = False,
) -> dict:
    """Reconstruction cosine and FVU of every dictionary on (at most ``config.eval_vectors`` per dictionary of)
    the vectors of ``eval_windows``, and, if ``config.check_perplexity``, perplexity with the cache at
    ``k_key/k_value`` against DynamicCache on the token sequence ``sequence [1, T]``."""
    meta = dictionary.config
    generator = torch.Generator().manual_seed(config.seed + 1)
    parts: dict[int, list[list[torch.Tensor]]] = {i: [[], []] for i in meta.layer_indices}
    for batch in iter_kv(
        model,
        eval_windows,
        layers=meta.layer_indices,
        key_space=meta.key_space,
        per_head=meta.per_head,
        batch_windows=config.batch_windows,
        skip_first=config.skip_first,
    ):
        for i in meta.layer_indices:
            parts[i][0].append(batch.keys[i])
            parts[i][1].append(batch.values[i])
    vectors = {}
    for i, (keys, values) in parts.items():
        keys, values = torch.cat(keys, dim=1), torch.cat(values, dim=1)
        pick = torch.randperm(keys.shape[1], generator=generator)[: config.eval_vectors]
        vectors[i] = (keys[:, pick], values[:, pick])
    per_layer = evaluate_dictionary(dictionary, vectors)
    out: dict = {
        "heldout_tokens": int(eval_windows.numel()),
        "heldout_vectors_per_dictionary": int(min(config.eval_vectors, next(iter(vectors.values()))[0].shape[1])),
        **summary(per_layer, meta.encoder),
    }
    if config.check_perplexity and sequence.numel() > PREFILL:
        out.update(_perplexity_ratio(model, dictionary, sequence, progress))
    elif config.check_perplexity:
        out["perplexity_ratio"] = f"not measured: no {config.eval_tokens} held-out tokens after the training text"
    out["per_layer"] = {
        str(i): {kind: round(stats["cos"], 4) for kind, stats in by_kind.items()} for i, by_kind in per_layer.items()
    }
    return out


def _perplexity_ratio(model, dictionary: KVDictionary, sequence: torch.Tensor, progress: bool) -> dict:
    from ..evaluation.perplexity import perplexity  # evaluation imports training: resolved at call time

    meta = dictionary.config
    attention = model.config._attn_implementation
    model.set_attn_implementation("sta")
    try:
        dense = perplexity(
            model,
            [sequence],
            lambda: DynamicCache(config=model.config),
            prefill=PREFILL,
            chunk=CHUNK,
            progress=progress,
            desc="check: DynamicCache",
        )
        sparse = perplexity(
            model,
            [sequence],
            lambda: SparseSemanticCache(
                dictionary, config=model.config, residual_length=WINDOW, num_sink_tokens=DEFAULT_SINKS
            ),
            prefill=PREFILL,
            chunk=CHUNK,
            progress=progress,
            desc=f"check: sta {meta.k_key}/{meta.k_value}",
        )
    finally:
        model.set_attn_implementation(attention)
    return {
        "perplexity_ratio": round(sparse.perplexity / dense.perplexity, 4),
        "perplexity_setting": f"k {meta.k_key}/{meta.k_value}, window {WINDOW} + {DEFAULT_SINKS} sinks, "
        f"{sequence.shape[-1]} held-out tokens, prefill {PREFILL} then chunks of {CHUNK}",
        "perplexity_dense": round(dense.perplexity, 3),
        "perplexity_sta": round(sparse.perplexity, 3),
    }
