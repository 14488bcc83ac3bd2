"""Perplexity of a model whose cache is fed the way generation feeds it: a prefill, then chunks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from ..compat import cache_kwargs


@dataclass
class PerplexityResult:
    perplexity: float
    accuracy: float
    tokens: int
    memory: dict | None  # the cache's memory_footprint() after the last text, if it has one
    per_text: list[float]  # perplexity of each text alone, in input order


@torch.no_grad()
def perplexity(
    model,
    texts: Iterable[torch.Tensor],
    make_cache: Callable[[], Cache],
    *,
    prefill: int = 256,
    chunk: int = 32,
    progress: bool = True,
    desc: str = "perplexity",
    measure: Callable[[Cache], dict] | None = None,
) -> PerplexityResult:
    """Feed each ``[1, T]`` token tensor as a prefill of ``prefill`` tokens and then chunks of ``chunk`` tokens
    through a fresh cache, and score the next-token predictions made after the prefill (the ones that read a
    possibly compressed cache). Returns perplexity (over all scored tokens, and of each text alone), next-token
    accuracy and the scored token count.

    ``memory`` is ``measure(cache)`` after the last text when ``measure`` is given (e.g.
    :func:`sta_cache.evaluation.bytes.cache_bytes`, which counts any cache), else the cache's
    ``memory_footprint()`` if it has one."""
    texts = list(texts)
    total_nll, total_correct, total_tokens, memory, per_text = 0.0, 0, 0, None, []
    bar = tqdm(total=sum(t.shape[-1] - prefill for t in texts), desc=desc, unit="tok", disable=not progress)
    for ids in texts:
        ids = ids.reshape(1, -1).to(model.device)
        cache = make_cache()
        text_nll, text_tokens = 0.0, 0
        logits = model(ids[:, :prefill], **cache_kwargs(model, cache)).logits[:, -1:]
        for start in range(prefill, ids.shape[1], chunk):
            targets = ids[:, start : start + chunk]
            out = model(targets, **cache_kwargs(model, cache)).logits
            predicted = torch.cat([logits, out[:, :-1]], dim=1)  # the predictions of this chunk's tokens
            text_nll += F.cross_entropy(predicted[0].float(), targets[0], reduction="sum").item()
            text_tokens += targets.shape[1]
            total_correct += int((predicted[0].argmax(-1) == targets[0]).sum())
            logits = out[:, -1:]
            bar.update(targets.shape[1])
        total_nll, total_tokens = total_nll + text_nll, total_tokens + text_tokens
        per_text.append(math.exp(text_nll / text_tokens))
        if measure is not None:
            memory = measure(cache)
        elif hasattr(cache, "memory_footprint"):
            memory = cache.memory_footprint()
    bar.close()
    return PerplexityResult(
        math.exp(total_nll / total_tokens), total_correct / total_tokens, total_tokens, memory, per_text
    )
