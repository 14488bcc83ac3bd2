"""What ``sta-cache analyze`` and ``sta-cache eval`` start from: threads, output folder, model and dictionary."""

from __future__ import annotations

from pathlib import Path

import torch

from ..configs import AnalyzeConfig, EvalConfig
from ..dictionary import KVDictionary

__all__ = ["prepare"]


def prepare(command: str, config: AnalyzeConfig | EvalConfig, model=None, tokenizer=None, dictionary=None):
    """Set the thread count, create ``config.out``, and load the model (sdpa attention) and dictionary that
    ``config`` names unless they are given (tests pass tiny ones). Returns ``(model, tokenizer, dictionary, out)``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        from ..embedded import load_model

        model, tokenizer = load_model(config.model, attn_implementation="sdpa")
    if dictionary is None:
        if config.dictionary is None:
            raise ValueError(f"{command} needs --dictionary (a trained dictionary folder or Hub id)")
        dictionary = KVDictionary.from_pretrained(config.dictionary)
    return model, tokenizer, dictionary, out
