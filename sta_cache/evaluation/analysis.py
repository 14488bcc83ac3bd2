"""`sta-cache analyze`: the paper's dictionary analyses on held-out keys and values.

* **Semantic Elbow**: reconstruction cosine ("directionality") and fraction of variance unexplained (FVU) against
  the number of atoms k in {1, 2, 4, ..., 64}, for keys and values of every layer, on vectors the model caches over
  the held-out (eval) Wikipedia split. Curves come from the trained dictionary coded with k atoms (truncation), and
  with ``train_per_k`` also from small dictionaries trained at each k.
* **Automatic elbow** per layer and kind, and a suggested dual budget ``(k_key, k_value)`` (:mod:`.elbow`).
* **Key-value asymmetry across depth**: shallow / middle / deep thirds of the compressed layers, in one figure.
* **Semantic atoms** of one layer (:mod:`.atoms`): the most used atoms with the tokens (and context) that use them
  most strongly, dead atoms and usage entropy.

Writes PNG plots (:mod:`.figures`), ``results.json`` and ``report.md`` (:mod:`.analysis_report`) to the output
folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import metrics
from ..cache import check_model_fits
from ..collect import iter_kv, token_windows
from ..configs import AnalyzeConfig, TrainConfig
from ..dictionary import KINDS, KVDictionary
from ..embedded import wikipedia_text
from ..metrics import average
from ..training import train_dictionary
from .analysis_report import render_report
from .atoms import atom_analysis
from .elbow import depth_groups, elbow_chord, elbow_gain, suggest_budget
from .figures import plot_asymmetry, plot_atom_usage, plot_elbow, plot_per_k
from .inputs import prepare

SPREAD = 32  # held-out windows are picked evenly among this many times as many consecutive ones

__all__ = ["collect_heldout", "elbow_curves", "reconstruction_stats", "run_analysis", "train_per_k"]


@torch.no_grad()
def reconstruction_stats(saes, x: torch.Tensor, k: int, chunk: int = 4096) -> dict[str, float]:
    """Mean cosine and FVU of ``x [H, n, d]`` coded with ``k`` atoms by ``saes`` (one SAE shared by all heads, or
    one per head). FVU = sum of squared errors / sum of squared deviations from the mean, per dictionary (all
    heads pooled for a shared one, then averaged over per-head ones)."""
    groups = [(saes[0], x.reshape(-1, x.shape[-1]))] if len(saes) == 1 else [(saes[h], x[h]) for h in range(len(saes))]
    cos_sum, count, fvus = 0.0, 0, []
    for sae, vectors in groups:
        vectors = vectors.float()
        error = 0.0
        for part in vectors.split(chunk):
            recon = sae.decode(*sae.encode(part, k)).float()
            error += metrics.squared_error(part, recon).item()
            cos_sum += metrics.cosine(recon, part).sum().item()
            count += part.shape[0]
        fvus.append(error / max(metrics.squared_deviation(vectors).item(), metrics.EPS))
    return {"cos": cos_sum / max(count, 1), "fvu": sum(fvus) / len(fvus)}


def collect_heldout(model, tokenizer, dictionary: KVDictionary, config: AnalyzeConfig, text_path=None):
    """``(windows [n, C], {layer: (keys, values)})`` with keys/values ``[H, m, d]`` in the dictionary's key space
    (the windows evenly spaced over the text),
    sink positions dropped; vector ``j`` of head ``h`` is window ``j // (C - skip)``, position
    ``skip + j % (C - skip)``."""
    meta = dictionary.config
    text_path = text_path or wikipedia_text("eval")
    # windows spread evenly over (up to 32x as much of) the text, so that they cover many articles
    windows = token_windows(tokenizer, text_path, config.context, config.windows * SPREAD)
    if len(windows) == 0:
        raise ValueError(f"{text_path} has no {config.context}-token window")
    windows = windows[torch.linspace(0, len(windows) - 1, min(config.windows, len(windows))).round().long()]
    parts: dict[int, tuple[list, list]] = {i: ([], []) for i in meta.layer_indices}
    batches = iter_kv(
        model,
        windows,
        layers=meta.layer_indices,
        key_space=meta.key_space,
        per_head=True,
        batch_windows=4,
        skip_first=config.skip_first,
    )
    for batch in tqdm(
        batches, total=math.ceil(len(windows) / 4), desc="collect held-out keys/values", disable=not config.progress
    ):
        for i in meta.layer_indices:
            parts[i][0].append(batch.keys[i])
            parts[i][1].append(batch.values[i])
    vectors = {i: (torch.cat(k, dim=1), torch.cat(v, dim=1)) for i, (k, v) in parts.items()}
    return windows, vectors


def _subset(x: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``limit`` vectors in all (the same positions for every head)."""
    per_head = max(1, limit // x.shape[0])
    if x.shape[1] <= per_head:
        return x
    return x[:, torch.randperm(x.shape[1], generator=generator)[:per_head].sort().values]


def _with_encoder(dictionary: KVDictionary, encoder: str | None) -> None:
    if encoder is None:
        return
    for i in dictionary.config.layer_indices:
        for kind in KINDS:
            for sae in dictionary[i].saes(kind):
                sae.encoder = encoder


def elbow_curves(dictionary: KVDictionary, vectors, ks: list[int], config: AnalyzeConfig) -> dict:
    """``{layer: {kind: {"cos": [...], "fvu": [...]}}}`` over ``ks`` (those <= N)."""
    generator = torch.Generator().manual_seed(config.seed)
    curves = {}
    layers = dictionary.config.layer_indices
    bar = tqdm(
        total=len(layers) * len(KINDS) * len(ks), desc="semantic elbow (layer x kind x k)", disable=not config.progress
    )
    for i in layers:
        curves[i] = {}
        for kind, x in zip(KINDS, vectors[i], strict=True):
            x = _subset(x, config.max_vectors, generator)
            curves[i][kind] = {"cos": [], "fvu": [], "vectors": int(x.shape[0] * x.shape[1])}
            for k in ks:
                stats = reconstruction_stats(dictionary[i].saes(kind), x, k)
                curves[i][kind]["cos"].append(stats["cos"])
                curves[i][kind]["fvu"].append(stats["fvu"])
                bar.update(1)
    bar.close()
    return curves


def train_per_k(model, tokenizer, dictionary: KVDictionary, vectors, ks: list[int], config: AnalyzeConfig) -> dict:
    """Small dictionaries trained at each k (same N, key space, encoder) on the train split; their held-out
    cosine/FVU at that k. Slow: one training run per k."""
    meta = dictionary.config
    generator = torch.Generator().manual_seed(config.seed)
    out = {"ks": ks, "settings": {"max_tokens": config.train_tokens, "epochs": config.train_epochs}, "layers": {}}
    for k in tqdm(ks, desc="train per k", disable=not config.progress):
        train_config = TrainConfig(
            method="mod" if meta.encoder == "omp" else "sae",
            n_atoms=meta.n_atoms,
            k_key=k,
            k_value=k,
            key_space=meta.key_space,
            encoder=meta.encoder,
            per_head=meta.per_head,
            max_tokens=config.train_tokens,
            eval_tokens=1024,
            epochs=config.train_epochs,
            seed=config.seed,
            base_model=meta.base_model,
            check_perplexity=False,
        )
        text = config.train_text or wikipedia_text("train")
        trained = train_dictionary(
            model, tokenizer, text, train_config, Path(config.out) / "per_k" / f"k{k}", progress=config.progress
        )
        _with_encoder(trained, config.encoder)
        for i in meta.layer_indices:
            entry = out["layers"].setdefault(str(i), {kind: {"cos": [], "fvu": []} for kind in KINDS})
            for kind, x in zip(KINDS, vectors[i], strict=True):
                stats = reconstruction_stats(trained[i].saes(kind), _subset(x, config.max_vectors, generator), k)
                entry[kind]["cos"].append(stats["cos"])
                entry[kind]["fvu"].append(stats["fvu"])
    return out


def run_analysis(config: AnalyzeConfig, model=None, tokenizer=None, dictionary=None, text_path=None) -> dict:
    """Run every analysis and write ``results.json``, ``report.md`` and the plots to ``config.out``."""
    start = time.perf_counter()
    model, tokenizer, dictionary, out = prepare("analyze", config, model, tokenizer, dictionary)
    check_model_fits(dictionary, model.config)
    _with_encoder(dictionary, config.encoder)
    meta = dictionary.config
    layers = list(meta.layer_indices)
    ks = [k for k in config.ks if 1 <= k <= meta.n_atoms]
    if len(ks) < 2:
        raise ValueError(f"need at least two k values <= N={meta.n_atoms}, got {config.ks}")
    layer = config.layer if config.layer is not None else layers[len(layers) // 2]
    if layer not in layers:
        raise ValueError(f"layer {layer} has no dictionary (compressed layers: {layers})")

    windows, vectors = collect_heldout(model, tokenizer, dictionary, config, text_path)
    curves = elbow_curves(dictionary, vectors, ks, config)
    elbows = {
        i: {
            kind: {
                "chord": elbow_chord(ks, curves[i][kind]["cos"]),
                "gain": elbow_gain(ks, curves[i][kind]["cos"], config.gain_threshold),
            }
            for kind in KINDS
        }
        for i in layers
    }
    suggestion = suggest_budget({i: {kind: elbows[i][kind]["chord"] for kind in KINDS} for i in layers}, layers)
    suggestion["gain_rule"] = suggest_budget(
        {i: {kind: elbows[i][kind]["gain"] for kind in KINDS} for i in layers}, layers
    )
    groups = depth_groups(layers)
    ref = min(ks, key=lambda k: abs(k - config.reference_k))
    r = ks.index(ref)
    asymmetry = {
        name: {
            "layers": members,
            **{f"{kind}_cos_at_k{ref}": average([curves[i][kind]["cos"][r] for i in members]) for kind in KINDS},
            **{f"{kind}_fvu_at_k{ref}": average([curves[i][kind]["fvu"][r] for i in members]) for kind in KINDS},
            **{
                f"{kind}_cos_curve": [average([curves[i][kind]["cos"][j] for i in members]) for j in range(len(ks))]
                for kind in KINDS
            },
            **{
                f"{kind}_fvu_curve": [average([curves[i][kind]["fvu"][j] for i in members]) for j in range(len(ks))]
                for kind in KINDS
            },
        }
        for name, members in groups.items()
        if members
    }
    atoms = atom_analysis(dictionary, tokenizer, windows, vectors, layer, config)
    per_k = train_per_k(model, tokenizer, dictionary, vectors, ks, config) if config.train_per_k else None

    results = {
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "model": getattr(model.config, "_name_or_path", config.model),
        "dictionary": {
            "path": config.dictionary,
            **{k: v for k, v in asdict(meta).items() if k not in ("training", "evaluation", "measured")},
        },
        "encoder": config.encoder or meta.encoder,
        "heldout": {
            "windows": int(windows.shape[0]),
            "context": int(windows.shape[1]),
            "vectors_per_layer_kind": curves[layers[0]]["key"]["vectors"],
        },
        "ks": ks,
        "elbow_rule": "chord (Kneedle) on cosine vs log2(k), see sta_cache.evaluation.elbow.elbow_chord",
        "layers": {
            str(i): {"group": next(g for g, m in groups.items() if i in m), **curves[i], "elbow": elbows[i]}
            for i in layers
        },
        "suggested_budget": suggestion,
        "asymmetry": {"reference_k": ref, "groups": asymmetry},
        "atoms": atoms,
        "per_k": per_k,
    }
    plots = {
        "elbow": plot_elbow(results, out / "elbow.png"),
        "asymmetry": plot_asymmetry(results, out / "asymmetry.png"),
        "atoms": plot_atom_usage(results, out / f"atoms_layer{layer}.png"),
    }
    if per_k:
        plots["per_k"] = plot_per_k(results, out / "per_k.png")
    results["plots"] = {name: path.name for name, path in plots.items()}
    results["seconds"] = round(time.perf_counter() - start, 1)
    for kind in KINDS:
        results["atoms"][kind].pop("sorted_usage")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "report.md").write_text(render_report(results))
    return results
