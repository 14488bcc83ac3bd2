"""End to end on the real SmolLM2-135M (slow: converts the embedded GGUF once, then ~1 min)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import make_dictionary
from sta_cache import SparseSemanticCache
from sta_cache.compat import cache_kwargs
from sta_cache.embedded import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", attn_implementation="sta")


@pytest.mark.parametrize("attn", ["sta", "sdpa"])
def test_exact_dictionary_generates_dynamic_cache_text(smollm2, attn):
    """With the complete signed basis every code is exact, so greedy text equals DynamicCache's, token for token,
    through both attention paths on the real model, batched with left padding."""
    model, tokenizer = smollm2
    model.set_attn_implementation(attn)
    tokenizer.padding_side = "left"
    prompts = ["The history of the printing press begins", "Water boils at"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    dictionary = make_dictionary(model, kind="exact", key_space="pre_rope")
    outputs = {}
    for name, cache in (
        ("dynamic", DynamicCache(config=model.config)),
        ("sparse", SparseSemanticCache(dictionary, residual_length=8, num_sink_tokens=2, config=model.config)),
    ):
        outputs[name] = model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=24, do_sample=False)
    model.set_attn_implementation("sta")
    assert torch.equal(outputs["dynamic"], outputs["sparse"])
    assert cache.memory_footprint()["code_bytes"] > 0
