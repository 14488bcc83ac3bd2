"""What ``sta-cache analyze`` and ``sta-cache eval`` start from: threads, output folder, model and dictionary."""

from __future__ import annotations

from pathlib import Path

import torch

from ..configs import AnalyzeConfig, EvalConfig
from ..dictionary import KVDictionary

__all__ = ["TextFileError", "file_texts", "prepare"]


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


class TextFileError(ValueError):
    """A ``--text`` file that cannot be evaluated: missing, not UTF-8, or too short."""


def file_texts(tokenizer, paths: list[str], context: int, prefill: int) -> list[torch.Tensor]:
    """The token ids (1-D, the tokenizer's special tokens included) of each UTF-8 file in ``paths``, one text per
    file, cut to its first ``context`` tokens. A file must give more than ``prefill`` tokens: the tokens after the
    prefill are the ones scored."""
    texts = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise TextFileError(f"--text {name}: no such file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise TextFileError(f"--text {name}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        ids = tokenizer(text)["input_ids"][:context]
        if len(ids) <= prefill:
            raise TextFileError(
                f"--text {name}: {len(ids)} tokens, but the first {prefill} are the prefill and only the tokens "
                f"after it are scored; give a longer text or a smaller --prefill"
            )
        texts.append(torch.tensor(ids, dtype=torch.long))
    return texts
