"""`sta-cache eval`: quality against bytes for SparseSemanticCache, DynamicCache and transformers' QuantizedCache.

For each cache configuration (:mod:`.specs`) it measures, on held-out Wikipedia text fed the way generation feeds a
cache (a prefill, then chunks; see :func:`~sta_cache.evaluation.perplexity.perplexity`):

* perplexity and next-token accuracy;
* passkey retrieval (:mod:`.passkey`): a 5-digit key hidden at several depths of filler text, prompts up to
  ``max_context`` tokens, the answer greedy-generated from the cache;
* bytes per token, counted from the tensors the cache really holds after the last text (:mod:`.bytes`).

It writes ``results.json``, ``report.md`` (the table) and ``pareto.png`` (perplexity ratio vs bytes per token).
A baseline whose backend cannot be installed or fails here is kept in the table as unavailable, with the reason.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from ..configs import EvalConfig
from ..embedded import eval_texts
from .bytes import cache_bytes
from .figures import plot_pareto
from .inputs import prepare
from .passkey import greedy_answer, passkey_correct, passkey_suite
from .perplexity import perplexity
from .report import render_report
from .specs import CacheSpec, cache_specs

__all__ = ["run_eval"]


def _evaluate_spec(model, tokenizer, spec: CacheSpec, texts, prompts, config: EvalConfig) -> dict:
    model.set_attn_implementation(spec.attn)
    start = time.perf_counter()
    last = {}

    def measure(cache):
        last.update(cache_bytes(cache))
        return dict(last)

    result = perplexity(
        model,
        texts,
        spec.make,
        prefill=config.prefill,
        chunk=config.chunk,
        progress=config.progress,
        desc=f"{spec.name}: perplexity",
        measure=measure,
    )
    trials = []
    for prompt in tqdm(prompts, desc=f"{spec.name}: passkey", disable=not config.progress, leave=False):
        answer_ids = greedy_answer(
            model,
            prompt.input_ids,
            spec.make(),
            config.passkey_new_tokens,
            config.passkey_feed,
            config.prefill,
            config.chunk,
        )
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
        trials.append(
            {
                "length": int(prompt.input_ids.numel()),
                "depth": prompt.depth,
                "actual_depth": round(prompt.actual_depth, 4),
                "key": prompt.key,
                "answer": answer,
                "correct": passkey_correct(answer, prompt.key),
            }
        )
    return {
        "perplexity": result.perplexity,
        "per_text_perplexity": result.per_text,
        "accuracy": result.accuracy,
        "scored_tokens": result.tokens,
        "bytes": result.memory,
        "passkey": {
            "accuracy": sum(t["correct"] for t in trials) / len(trials) if trials else None,
            "trials": trials,
        },
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_eval(config: EvalConfig, model=None, tokenizer=None, dictionary=None, texts=None) -> dict:
    """Run every configuration, write ``results.json``, ``report.md`` and ``pareto.png`` to ``config.out``;
    return the results. ``model``/``tokenizer``/``dictionary``/``texts`` may be passed in (tests)."""
    torch.manual_seed(config.seed)
    model, tokenizer, dictionary, out = prepare("eval", config, model, tokenizer, dictionary)
    if config.encoder is not None:  # the cache codes with the encoder its dictionary's config names
        dictionary.config.encoder = config.encoder
    if texts is None:
        texts = eval_texts(tokenizer, config.n_texts, config.context)
    prompts = passkey_suite(tokenizer, config)
    specs = cache_specs(model, dictionary, config)
    rows = []
    for spec in tqdm(specs, desc="eval configurations", disable=not config.progress):
        row = {
            "name": spec.name,
            "family": spec.family,
            "attn": spec.attn,
            "params": spec.params,
            "available": spec.make is not None,
            "reason": spec.reason,
        }
        if spec.make is not None:
            try:
                row.update(_evaluate_spec(model, tokenizer, spec, texts, prompts, config))
            except Exception as error:  # noqa: BLE001 - reported in the table, never dropped
                row["available"] = False
                row["reason"] = f"failed while running: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                row["traceback"] = traceback.format_exc(limit=4)
        rows.append(row)
    model.set_attn_implementation("sdpa")
    dense = next((r for r in rows if r["family"] == "dynamic" and r.get("perplexity")), None)
    for row in rows:
        if dense and row.get("perplexity"):
            row["perplexity_ratio"] = row["perplexity"] / dense["perplexity"]
            row["per_text_ratio"] = [
                p / d for p, d in zip(row["per_text_perplexity"], dense["per_text_perplexity"], strict=True)
            ]
            row["compression_vs_dynamic"] = dense["bytes"]["per_token"] / row["bytes"]["per_token"]
    results = {
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "model": getattr(model.config, "_name_or_path", config.model),
        "dictionary": {
            "path": config.dictionary,
            **{k: v for k, v in asdict(dictionary.config).items() if k not in ("training", "evaluation")},
        },
        "texts": {
            "count": len(texts),
            "tokens_each": int(texts[0].numel()),
            "passkey_lengths": config.lengths(),
            "passkey_depths": config.passkey_depths,
            "passkey_trials": config.passkey_trials,
        },
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    plot_pareto(rows, out / "pareto.png", config)
    (out / "report.md").write_text(render_report(results))
    return results
