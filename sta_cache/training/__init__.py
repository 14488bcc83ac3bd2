"""Learning dictionaries from a model's cached keys and values.

Two recipes, both saving a :class:`~sta_cache.dictionary.KVDictionary` that the cache loads:

* :func:`train_dictionary` (``sta-cache train``): Top-K sparse autoencoders trained by gradient descent
  (:mod:`.loop` drives :mod:`.run`, which holds the stacked SAEs of :mod:`.sae` and the reservoirs of
  :mod:`.reservoir`; :mod:`.checkpoint` resumes it, :mod:`.heldout` measures it).
* :func:`train_pursuit_dictionary` (``sta-cache train-pursuit``): atoms for matching-pursuit codes by the Method
  of Optimal Directions (:mod:`.pursuit`), the recipe of the shipped dictionaries.
"""

from __future__ import annotations

from ..configs import PursuitConfig, TrainConfig
from .heldout import evaluate_dictionary
from .loop import train_dictionary
from .pursuit import learn_pursuit_dictionary, omp_reconstruct, train_pursuit_dictionary

__all__ = [
    "PursuitConfig",
    "TrainConfig",
    "evaluate_dictionary",
    "learn_pursuit_dictionary",
    "omp_reconstruct",
    "train_dictionary",
    "train_pursuit_dictionary",
]
