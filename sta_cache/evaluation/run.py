"""`sta-cache eval`: quality against bits per element for SparseSemanticCache, DynamicCache, the quantizer
baselines (rotated Lloyd-Max, KIVI) and transformers' QuantizedCache.

For each cache configuration (:mod:`.specs`) it measures, on held-out Wikipedia text (or the user's ``--text``
files) fed the way generation feeds a cache (a prefill, then chunks; see
:func:`~sta_cache.evaluation.perplexity.perplexity`):

* perplexity and next-token accuracy, over all texts and per text, and their ratios to DynamicCache;
* passkey retrieval (:mod:`.passkey`): a 5-digit key hidden at several depths of filler text, prompts up to
  ``max_context`` tokens, the answer greedy-generated from the cache;
* bytes, counted from the tensors the cache really holds after the last text, and bits per element
  (:mod:`.bytes`), also with the fixed dictionary bytes amortised over ``AMORTISED_CONTEXTS``.

A configuration with rotation seeds is run once per seed; its row holds the mean and each seed's results.
It writes ``results.json``, ``report.md`` (the table), ``pareto.png`` (perplexity ratio vs bits per element) and
``pareto_amortised.png``. A baseline whose backend cannot be installed or fails here is kept in the table as
unavailable, with the reason. With ``record_budgets`` the STA rows' bits per element and ratios are merged into
the dictionary folder's config.json, where ``bits_per_element=`` chooses from them (:mod:`sta_cache.budgets`).
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict
from functools import partial
from pathlib import Path
from statistics import fmean

import torch
from tqdm.auto import tqdm

from ..allocation import LayerSensitivity
from ..budgets import check_dictionary_folder, measured_budgets, record_budgets, write_config_field
from ..configs import EvalConfig
from ..embedded import eval_texts, text_windows
from .bytes import amortised_bits_per_element, cache_bytes
from .figures import plot_amortised, plot_pareto
from .inputs import file_texts, prepare
from .passkey import greedy_answer, passkey_correct, passkey_suite
from .perplexity import perplexity
from .report import render_report
from .sensitivity import measure_sensitivity
from .specs import CacheSpec, cache_specs

__all__ = ["AMORTISED_CONTEXTS", "run_eval"]

AMORTISED_CONTEXTS = (2048, 32768)  # contexts (batch 1) over which the dictionary bytes are amortised
# --allocate-bits measures a dictionary's layer sensitivity on this much training text when it has none
SENSITIVITY_TEXTS, SENSITIVITY_TOKENS, SENSITIVITY_PREFILL = 2, 768, 256


def _evaluate_spec(model, tokenizer, spec: CacheSpec, texts, prompts, config: EvalConfig) -> dict:
    """One configuration's measurements; with seeds, each seed's run and their mean."""
    model.set_attn_implementation(spec.attn)
    if not spec.seeds:
        return _evaluate_run(model, tokenizer, spec.make, spec.name, texts, prompts, config)
    runs = [
        _evaluate_run(
            model, tokenizer, partial(spec.make, seed=seed), f"{spec.name} seed {seed}", texts, prompts, config
        )
        for seed in spec.seeds
    ]
    trials = [
        {**trial, "seed": seed}
        for seed, run in zip(spec.seeds, runs, strict=True)
        for trial in run["passkey"]["trials"]
    ]
    return {
        "perplexity": fmean(run["perplexity"] for run in runs),
        "per_text_perplexity": [
            fmean(values) for values in zip(*(run["per_text_perplexity"] for run in runs), strict=True)
        ],
        "accuracy": fmean(run["accuracy"] for run in runs),
        "scored_tokens": runs[0]["scored_tokens"],
        "bytes": runs[0]["bytes"],  # the same format for every seed
        "passkey": {
            "accuracy": sum(t["correct"] for t in trials) / len(trials) if trials else None,
            "trials": trials,
        },
        "seconds": round(sum(run["seconds"] for run in runs), 1),
        "seeds": spec.seeds,
        "per_seed": [
            {"seed": seed, **{k: run[k] for k in ("perplexity", "per_text_perplexity", "accuracy")}}
            for seed, run in zip(spec.seeds, runs, strict=True)
        ],
    }


def _evaluate_run(model, tokenizer, make, name: str, texts, prompts, config: EvalConfig) -> dict:
    start = time.perf_counter()
    last = {}

    def measure(cache):
        last.update(cache_bytes(cache))
        return dict(last)

    result = perplexity(
        model,
        texts,
        make,
        prefill=config.prefill,
        chunk=config.chunk,
        progress=config.progress,
        desc=f"{name}: perplexity",
        measure=measure,
    )
    trials = []
    for prompt in tqdm(prompts, desc=f"{name}: passkey", disable=not config.progress, leave=False):
        answer_ids = greedy_answer(
            model,
            prompt.input_ids,
            make(),
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


def _add_ratios(rows: list[dict]) -> None:
    """Bits per element (also amortised) and the perplexity ratios to the DynamicCache row of every measured row."""
    dense = next((r for r in rows if r["family"] == "dynamic" and r.get("perplexity")), None)
    for row in rows:
        if not row.get("perplexity"):
            continue
        row["bits_per_element"] = row["bytes"]["bits_per_element"]
        row["bytes"]["amortised_bits_per_element"] = {
            str(context): amortised_bits_per_element(row["bytes"], context) for context in AMORTISED_CONTEXTS
        }
        if dense:
            for run in (row, *row.get("per_seed", ())):
                run["ppl_ratio"] = run["perplexity"] / dense["perplexity"]
                run["ppl_ratio_per_text"] = [
                    p / d for p, d in zip(run["per_text_perplexity"], dense["per_text_perplexity"], strict=True)
                ]
            row["compression_vs_dynamic"] = dense["bytes"]["per_token"] / row["bytes"]["per_token"]


def _layer_sensitivity(model, tokenizer, dictionary, config: EvalConfig, out: Path) -> LayerSensitivity:
    """The layer sensitivity that ``--allocate-bits`` allocates from: ``config.sensitivity``'s file, else the
    dictionary's, else measured now on the training split (never the held-out texts), saved to
    ``out/sensitivity.json`` and, with ``record_budgets``, into the dictionary folder."""
    if config.sensitivity:
        sensitivity = LayerSensitivity(**json.loads(Path(config.sensitivity).read_text()))
    elif dictionary.config.layer_sensitivity is not None:
        sensitivity = dictionary.config.layer_sensitivity
    else:
        texts = text_windows(tokenizer, "train", SENSITIVITY_TEXTS, SENSITIVITY_TOKENS)
        model.set_attn_implementation("sdpa")
        sensitivity = measure_sensitivity(
            model,
            dictionary,
            texts,
            atoms=tuple(config.sensitivity_atoms),
            prefill=SENSITIVITY_PREFILL,
            chunk=config.chunk,
            cache_arguments=dict(
                residual_length=config.residual_length,
                num_sink_tokens=config.num_sink_tokens,
                value_pursuit=config.value_pursuit,
            ),
            measured_on=(
                f"{SENSITIVITY_TEXTS} texts x {SENSITIVITY_TOKENS} tokens of the embedded Wikipedia train split, "
                f"prefill {SENSITIVITY_PREFILL}, chunks of {config.chunk}, window {config.residual_length} + "
                f"{config.num_sink_tokens} sinks"
            ),
            progress=config.progress,
        )
        (out / "sensitivity.json").write_text(json.dumps(sensitivity.to_dict(), indent=1) + "\n")
        if config.record_budgets:
            write_config_field(config.dictionary, "sensitivity", sensitivity.to_dict())
    layers = len(dictionary.config.layer_indices)
    if sensitivity.num_layers != layers:
        raise ValueError(
            f"the sensitivity covers {sensitivity.num_layers} layers, the dictionary {layers}: it was measured for "
            "another dictionary"
        )
    return sensitivity


def run_eval(config: EvalConfig, model=None, tokenizer=None, dictionary=None, texts=None) -> dict:
    """Run every configuration, write ``results.json``, ``report.md`` and ``pareto.png`` to ``config.out``;
    return the results. ``model``/``tokenizer``/``dictionary``/``texts`` may be passed in (tests)."""
    if config.record_budgets:
        check_dictionary_folder(config.dictionary)  # before anything runs
    torch.manual_seed(config.seed)
    model, tokenizer, dictionary, out = prepare("eval", config, model, tokenizer, dictionary)
    if config.encoder is not None:  # the cache codes with the encoder its dictionary's config names
        dictionary.config.encoder = config.encoder
    if texts is None and config.texts:
        texts = file_texts(tokenizer, config.texts, config.context, config.prefill)
    elif texts is None:
        texts = eval_texts(tokenizer, config.n_texts, config.context)
    prompts = passkey_suite(tokenizer, config)
    sensitivity = _layer_sensitivity(model, tokenizer, dictionary, config, out) if config.allocate_bits else None
    specs = cache_specs(model, dictionary, config, sensitivity)
    rows = []
    results = {
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "model": getattr(model.config, "_name_or_path", config.model),
        "dictionary": {
            "path": config.dictionary,
            **{
                k: v
                for k, v in asdict(dictionary.config).items()
                if k not in ("training", "evaluation", "measured", "sensitivity")
            },
        },
        "texts": {
            "source": config.texts or "embedded Wikipedia eval split",
            "count": len(texts),
            "tokens": [int(text.numel()) for text in texts],
            "passkey_lengths": config.lengths(),
            "passkey_depths": config.passkey_depths,
            "passkey_trials": config.passkey_trials,
        },
        "rows": rows,
    }
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
        _add_ratios(rows)
        # after every row: a long eval that is stopped keeps what it measured
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    model.set_attn_implementation("sdpa")
    plot_pareto(rows, out / "pareto.png", config)
    plot_amortised(rows, out / "pareto_amortised.png", config)
    (out / "report.md").write_text(render_report(results))
    if config.record_budgets:
        results["recorded_budgets"] = [
            b.to_dict() for b in record_budgets(config.dictionary, measured_budgets(results))
        ]
    return results
