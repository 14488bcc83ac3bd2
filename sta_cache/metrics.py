"""How well a dictionary reconstructs vectors: fraction of variance unexplained (FVU) and cosine similarity.

Training logs, held-out evaluations, the MOD recipe and ``sta-cache analyze`` all report these two numbers; one
definition keeps them comparable. FVU is the squared reconstruction error over the squared deviation from the
data's mean (0: perfect, 1: no better than the mean vector); the denominator is floored at :data:`EPS` so constant
data gives a finite number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12

__all__ = [
    "EPS",
    "average",
    "cosine",
    "fraction_of_variance_unexplained",
    "mean_cosine",
    "mean_squared_norm",
    "squared_deviation",
    "squared_error",
    "variance",
]


def squared_error(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences over every element (a 0-d tensor)."""
    return (x - reconstruction).pow(2).sum()


def squared_deviation(x: torch.Tensor) -> torch.Tensor:
    """Sum of squared deviations of the vectors ``x [n, d]`` from their mean (a 0-d tensor)."""
    return (x - x.mean(0)).pow(2).sum()


def fraction_of_variance_unexplained(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """FVU of the reconstructions of ``x [n, d]``, all vectors pooled (a 0-d tensor)."""
    return squared_error(x, reconstruction) / squared_deviation(x).clamp_min(EPS)


def cosine(reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each vector with its reconstruction: ``[..., d] -> [...]``."""
    return F.cosine_similarity(reconstruction, x, dim=-1)


def mean_cosine(reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:func:`cosine` averaged over the vectors: ``[..., n, d] -> [...]``."""
    return cosine(reconstruction, x).mean(-1)


def mean_squared_norm(x: torch.Tensor) -> torch.Tensor:
    """Mean over the vectors of their squared norm: ``[..., n, d] -> [...]``."""
    return x.pow(2).sum(-1).mean(-1)


def variance(x: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the vectors to their mean: ``[..., n, d] -> [...]`` (the FVU denominator per
    vector, for stacks of dictionaries trained together)."""
    return mean_squared_norm(x - x.mean(-2, keepdim=True))


def average(values: list[float]) -> float:
    """Mean of plain numbers (a statistic over layers), NaN for none."""
    return sum(values) / len(values) if values else float("nan")
