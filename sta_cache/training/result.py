"""What a training method hands back to :func:`sta_cache.training.train_dictionary`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["DictionaryKey", "MethodResult"]

DictionaryKey = tuple[int, str, int]  # (layer, kind, head group)


@dataclass
class MethodResult:
    """The weights of each ``(layer, kind, head group)`` dictionary (parameters of
    :class:`~sta_cache.sae.TopKSAE` by name), a record of how they were trained, the method's own held-out
    evaluation (a flat summary for the dictionary's config) and its detail for ``evaluation.json``."""

    weights: dict[DictionaryKey, dict[str, torch.Tensor]]
    training: dict
    evaluation: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
