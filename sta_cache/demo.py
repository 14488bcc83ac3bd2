"""`sta-cache demo`: generate with DynamicCache and with SparseSemanticCache on the embedded default model and
print both texts, the memory saved and held-out perplexity."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import DynamicCache

from .cache import SparseSemanticCache
from .compat import cache_kwargs
from .configs import DemoConfig, TrainConfig
from .dictionary import DictionaryFormatError, KVDictionary
from .embedded import default_cache_dir, eval_texts, load_model, wikipedia_text
from .evaluation.perplexity import perplexity

PACKAGED_DICTIONARIES = {"smollm2": "sta-cache/SmolLM2-135M-Instruct", "gemma3": "sta-cache/gemma-3-270m"}


def demo_dictionary(name: str, model, tokenizer, dictionary: str | None) -> tuple[KVDictionary, str]:
    """The dictionary the demo runs with and where it came from (Hub id or folder): the one asked for, the
    packaged one, or small ones trained here once."""
    if dictionary is not None:
        return KVDictionary.from_pretrained(dictionary), dictionary
    if name in PACKAGED_DICTIONARIES:
        try:
            return KVDictionary.from_pretrained(PACKAGED_DICTIONARIES[name]), PACKAGED_DICTIONARIES[name]
        except DictionaryFormatError:
            pass
    from .training import train_dictionary

    out = default_cache_dir() / "dictionaries" / f"{Path(str(name)).name}-demo"
    try:
        return KVDictionary.from_pretrained(out), str(out)
    except DictionaryFormatError:
        print(f"No pretrained dictionaries for {name}: training small ones into {out} (a few minutes, once).")
        quick = TrainConfig(n_atoms=256, max_tokens=16_000)  # the default method (MOD), fewer atoms
        return train_dictionary(model, tokenizer, wikipedia_text("train"), quick, out), str(out)


def _format_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def run_demo(config: DemoConfig) -> dict:
    torch.manual_seed(0)
    model, tokenizer = load_model(config.model, attn_implementation="sta")
    dictionary, source = demo_dictionary(config.model, model, tokenizer, config.dictionary)
    meta = dictionary.config

    def sparse_cache() -> SparseSemanticCache:
        return SparseSemanticCache(
            dictionary,
            k_key=config.k_key,
            k_value=config.k_value,
            residual_length=config.residual_length,
            num_sink_tokens=config.num_sink_tokens,
            config=model.config,
        )

    def dynamic_cache() -> DynamicCache:
        return DynamicCache(config=model.config)

    held_out = eval_texts(tokenizer, config.eval_texts + 1, max(config.eval_tokens, config.prompt_tokens))
    if config.prompt is None:  # a long prompt, so that most of it is compressed before generation starts
        prompt_ids = held_out.pop()[: config.prompt_tokens].unsqueeze(0)
    else:
        prompt_ids, held_out = tokenizer(config.prompt, return_tensors="pt")["input_ids"], held_out[:-1]
    inputs = {"input_ids": prompt_ids.to(model.device), "attention_mask": torch.ones_like(prompt_ids)}
    prompt_text = tokenizer.decode(prompt_ids[0], skip_special_tokens=True)
    print(f"Prompt ({prompt_ids.shape[1]} tokens), ending: ...{prompt_text[-300:]}")
    texts, caches = {}, {}
    for name, make in (("DynamicCache", dynamic_cache), ("SparseSemanticCache", sparse_cache)):
        caches[name] = make()
        start = time.perf_counter()
        out = model.generate(
            **inputs, **cache_kwargs(model, caches[name]), max_new_tokens=config.max_new_tokens, do_sample=False
        )
        elapsed = time.perf_counter() - start
        texts[name] = tokenizer.decode(out[0, prompt_ids.shape[1] :], skip_special_tokens=True)
        print(f"\n=== {name} continuation ({elapsed:.1f} s) ===\n{texts[name]}")
    compressed = caches["SparseSemanticCache"].sparse_layers[0].num_compressed
    print(
        f"\n(SparseSemanticCache held {compressed} of {caches['SparseSemanticCache'].get_seq_length()} tokens as codes)"
    )
    held_out = [ids[: config.eval_tokens] for ids in held_out]
    quality = {
        name: perplexity(model, held_out, make, prefill=config.prefill, chunk=config.chunk, desc=name)
        for name, make in (("DynamicCache", dynamic_cache), ("SparseSemanticCache", sparse_cache))
    }
    memory = quality["SparseSemanticCache"].memory
    budget = caches["SparseSemanticCache"]
    print(
        f"\nDictionary: {source} (made for {meta.base_model}), N={meta.n_atoms}, {meta.key_space} keys, "
        f"{meta.encoder} encoder; "
        f"budget k_key={budget.k_key}, k_value={budget.k_value}; window {config.residual_length}, "
        f"{config.num_sink_tokens} sinks"
    )
    print(f"\nMemory at {config.eval_tokens} tokens of context (real bytes of the stored tensors):")
    print(f"  DynamicCache          {_format_bytes(memory['dynamic_cache_bytes'])}")
    print(
        f"  SparseSemanticCache   {_format_bytes(memory['code_bytes'] + memory['dense_bytes'])}"
        f"  (codes {_format_bytes(memory['code_bytes'])}, dense sinks+window {_format_bytes(memory['dense_bytes'])})"
    )
    print(
        f"  compression ratio     {memory['compression_ratio']:.2f}x   memory saved "
        f"{_format_bytes(memory['dynamic_cache_bytes'] - memory['code_bytes'] - memory['dense_bytes'])}"
    )
    print(
        f"  dictionaries          {_format_bytes(memory['dictionary_bytes'])}, paid back from "
        f"{memory['break_even_tokens']} tokens of context"
    )
    dense_ppl = quality["DynamicCache"].perplexity
    print(
        f"\nHeld-out Wikipedia perplexity ({config.eval_texts} texts x {config.eval_tokens} tokens, prefill "
        f"{config.prefill}, then chunks of {config.chunk}; {quality['DynamicCache'].tokens} scored tokens):"
    )
    for name, result in quality.items():
        print(
            f"  {name:<21} {result.perplexity:8.2f}  (x{result.perplexity / dense_ppl:.3f})  "
            f"next-token accuracy {result.accuracy:.3f}"
        )
    return {"texts": texts, "memory": memory, "perplexity": {n: r.perplexity for n, r in quality.items()}}
