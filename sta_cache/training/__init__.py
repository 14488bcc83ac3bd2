"""Learning dictionaries from a model's cached keys and values: :func:`train_dictionary` (``sta-cache train``).

:mod:`.train` runs a training job on one process or several (torch.distributed) and ends with the held-out check
of :mod:`.quality`. Two methods learn the atoms: :mod:`.mod` (the default: atoms for matching-pursuit codes by the
Method of Optimal Directions, the recipe of the shipped dictionaries) and :mod:`.loop` (Top-K sparse autoencoders
trained by gradient descent: :mod:`.run` holds the stacked SAEs of :mod:`.sae` and the reservoirs of
:mod:`.reservoir`). :mod:`.checkpoint` resumes either; :mod:`.heldout` measures reconstructions.
"""

from __future__ import annotations

from ..configs import TrainConfig
from ..text import TextSource
from .heldout import evaluate_dictionary
from .mod import learn_mod_dictionary, mod_step, omp_reconstruct
from .train import train_dictionary

__all__ = [
    "TextSource",
    "TrainConfig",
    "evaluate_dictionary",
    "learn_mod_dictionary",
    "mod_step",
    "omp_reconstruct",
    "train_dictionary",
]
