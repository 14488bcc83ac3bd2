"""Passkey retrieval: a 5-digit key hidden at some depth of filler text, answered greedily from the cache."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from ..compat import cache_kwargs
from ..configs import EvalConfig, PasskeyFeed, check_choice

__all__ = [
    "PASSKEY_INTRO",
    "PasskeyPrompt",
    "feed",
    "greedy_answer",
    "passkey_correct",
    "passkey_prompt",
    "passkey_suite",
]


PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    input_ids: torch.LongTensor  # [T]
    key: str
    depth: float  # requested: fraction of the filler placed before the needle
    actual_depth: float  # the fraction really placed before it (whole filler sentences)
    key_position: int  # token index where the needle starts
    needle_length: int


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of at most ``length`` tokens: intro, filler, the needle ``"The pass key is KEY ..."`` after a
    fraction ``depth`` of the filler (rounded to whole filler sentences), more filler, then the question.
    Pieces are tokenized separately and concatenated, so the needle's token span is known exactly."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    bos = (
        [tokenizer.bos_token_id]
        if tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        else []
    )
    prefix = bos + _ids(tokenizer, PASSKEY_INTRO)
    unit = _ids(tokenizer, PASSKEY_FILLER)
    needle = _ids(tokenizer, PASSKEY_NEEDLE.format(key=key))
    question = _ids(tokenizer, PASSKEY_QUESTION)
    room = length - len(prefix) - len(needle) - len(question)
    units = room // len(unit)
    if units < 1:
        raise ValueError(f"a passkey prompt needs more than {length} tokens")
    before = round(depth * units)
    ids = prefix + unit * before + needle + unit * (units - before) + question
    return PasskeyPrompt(
        input_ids=torch.tensor(ids, dtype=torch.long),
        key=key,
        depth=depth,
        actual_depth=before / units,
        key_position=len(prefix) + before * len(unit),
        needle_length=len(needle),
    )


@torch.no_grad()
def feed(model, ids: torch.Tensor, cache: Cache, prefill: int, chunk: int) -> torch.Tensor:
    """Feed ``ids [1, T]`` as a prefill of ``prefill`` tokens and then chunks of ``chunk`` (as
    :func:`~sta_cache.evaluation.perplexity.perplexity` does); return the last position's logits ``[1, V]``."""
    logits = model(ids[:, :prefill], **cache_kwargs(model, cache)).logits[:, -1]
    for start in range(prefill, ids.shape[1], chunk):
        logits = model(ids[:, start : start + chunk], **cache_kwargs(model, cache)).logits[:, -1]
    return logits


@torch.no_grad()
def greedy_answer(
    model,
    ids: torch.Tensor,
    cache: Cache,
    new_tokens: int,
    feed_mode: PasskeyFeed = "generate",
    prefill: int = 256,
    chunk: int = 32,
) -> list[int]:
    """Greedy answer tokens for the prompt ``ids [T]``. ``feed_mode="generate"``: ``model.generate`` (the whole
    prompt in one prefill, then one token per step); ``"chunked"``: the prompt fed as a prefill of ``prefill``
    tokens then chunks of ``chunk`` (so the prompt itself already reads a compressed cache), then greedy steps."""
    check_choice("feed_mode", feed_mode, PasskeyFeed)
    ids = ids.reshape(1, -1).to(model.device)
    if feed_mode == "generate":
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_kwargs(model, cache),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        return out[0, ids.shape[1] :].tolist()
    logits = feed(model, ids, cache, prefill, chunk)
    answer = []
    for _ in range(new_tokens):
        token = logits.argmax(-1, keepdim=True)  # [1, 1]
        answer.append(int(token))
        logits = model(token, **cache_kwargs(model, cache)).logits[:, -1]
    return answer


def passkey_correct(answer: str, key: str) -> bool:
    """The first number in the answer is the key (digits separated by single spaces are joined)."""
    match = re.search(r"\d+(?: \d+)*", answer)
    return match is not None and match.group(0).replace(" ", "") == key


def passkey_suite(tokenizer, config: EvalConfig) -> list[PasskeyPrompt]:
    rng = random.Random(config.seed)
    return [
        passkey_prompt(tokenizer, length, depth, str(rng.randint(10000, 99999)))
        for length in config.lengths()
        for depth in config.passkey_depths
        for _ in range(config.passkey_trials)
    ]
