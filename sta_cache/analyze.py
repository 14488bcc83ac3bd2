"""`sta-cache analyze`: the paper's dictionary analyses on held-out keys and values.

* **Semantic Elbow**: reconstruction cosine ("directionality") and fraction of variance unexplained (FVU) against
  the number of atoms k in {1, 2, 4, ..., 64}, for keys and values of every layer, on vectors the model caches over
  the held-out (eval) Wikipedia split. Curves come from the trained dictionary coded with k atoms (truncation), and
  with ``train_per_k`` also from small dictionaries trained at each k.
* **Automatic elbow** per layer and kind, and a suggested dual budget ``(k_key, k_value)``:
  see :func:`elbow_chord` (the rule used) and :func:`elbow_gain` (reported beside it).
* **Key-value asymmetry across depth**: shallow / middle / deep thirds of the compressed layers, in one figure.
* **Semantic atoms** of one layer: the most used atoms with the tokens (and context) that use them most strongly,
  dead atoms and usage entropy.

Writes PNG plots, ``results.json`` and ``report.md`` (embedding the plots) to the output folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .dictionary import KINDS, KVDictionary

__all__ = [
    "AnalyzeConfig",
    "atom_usage",
    "depth_groups",
    "elbow_chord",
    "elbow_gain",
    "reconstruction_stats",
    "run_analysis",
    "suggest_budget",
]

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)
GROUP_NAMES = ("shallow", "middle", "deep")
SPREAD = 32  # held-out windows are picked evenly among this many times as many consecutive ones


@dataclass
class AnalyzeConfig:
    """What ``sta-cache analyze`` runs; :meth:`preset` gives the full or ``--quick`` defaults."""

    model: str = "smollm2"
    dictionary: str | None = None
    out: str = "analyze_out"
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    context: int = 256  # tokens per held-out window
    windows: int = 24  # held-out windows (the vectors of every layer come from the same windows)
    skip_first: int = 4  # sink positions the cache keeps dense: left out of the statistics
    max_vectors: int = 16384  # per layer and kind (random subset beyond that)
    encoder: str | None = None  # None: the dictionary's own ("topk" or "omp")
    layer: int | None = None  # layer for the atom analysis (None: the middle compressed layer)
    reference_k: int = 8  # k at which the asymmetry figure compares keys and values
    gain_threshold: float = 0.01  # elbow_gain: cosine gained by the next doubling of k
    top_atoms: int = 10
    examples: int = 5
    train_per_k: bool = False
    train_tokens: int = 30_000  # per-k training text (tokens) with train_per_k
    train_epochs: float = 2.0
    train_text: str | None = None  # per-k training text (default: the embedded Wikipedia train split)
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    @classmethod
    def preset(cls, quick: bool, **overrides) -> AnalyzeConfig:
        base = dict(windows=8, max_vectors=4096, train_tokens=8_000, train_epochs=1.0) if quick else {}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


# ============================================================================================ the elbow
def elbow_chord(ks: list[int], ys: list[float]) -> int:
    """The k of the curve ``ys`` (increasing quality, e.g. cosine) farthest above its chord, in log2(k).

    Both axes are scaled to [0, 1] between the first point and the best point (the maximum of ``ys``; points after
    it are ignored, so a curve that degrades past some k, as a truncated Top-K dictionary can, still has an
    elbow). The elbow is the point maximising ``y_scaled - x_scaled``, the distance above the chord from the first
    to the best point (the "Kneedle" knee). A curve with no point above its chord (linear or convex in log k: no
    diminishing returns) returns the best point's k; a curve whose best point is its first returns that k.
    """
    if len(ks) != len(ys) or not ks:
        raise ValueError("ks and ys must be non-empty and of the same length")
    best = max(range(len(ys)), key=lambda i: (ys[i], -i))
    if best == 0:
        return ks[0]
    x = [math.log2(k) for k in ks[: best + 1]]
    y = list(ys[: best + 1])
    span_x, span_y = x[-1] - x[0], y[-1] - y[0]
    if span_y <= 0:
        return ks[0]
    distance = [(y[i] - y[0]) / span_y - (x[i] - x[0]) / span_x for i in range(best + 1)]
    i = max(range(best + 1), key=lambda j: (distance[j], -j))
    return ks[i] if distance[i] > 1e-9 else ks[best]


def elbow_gain(ks: list[int], ys: list[float], threshold: float = 0.01) -> int:
    """The smallest k after which the next step of the grid (a doubling of k) gains less than ``threshold``
    (absolute, e.g. cosine); the last k if every step gains more."""
    for i in range(len(ks) - 1):
        if ys[i + 1] - ys[i] < threshold:
            return ks[i]
    return ks[-1]


def depth_groups(layers: list[int]) -> dict[str, list[int]]:
    """The compressed layers cut into shallow / middle / deep thirds (by position in the list)."""
    n = len(layers)
    bounds = [round(n * i / 3) for i in range(4)]
    return {name: layers[bounds[i] : bounds[i + 1]] for i, name in enumerate(GROUP_NAMES)}


def _upper_median(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def suggest_budget(per_layer: dict[int, dict[str, int]], layers: list[int]) -> dict:
    """From per-layer elbows ``{layer: {"key": k, "value": k}}``: one global budget (upper median over layers,
    which stays on the k grid), one per depth group, and whether layers differ (then use the per-layer list)."""
    groups = depth_groups(layers)
    result = {
        "k_key": _upper_median([per_layer[i]["key"] for i in layers]),
        "k_value": _upper_median([per_layer[i]["value"] for i in layers]),
        "by_group": {
            name: {"k_key": _upper_median([per_layer[i]["key"] for i in members]),
                   "k_value": _upper_median([per_layer[i]["value"] for i in members])}  # fmt: skip
            for name, members in groups.items() if members
        },
        "per_layer": {str(i): [per_layer[i]["key"], per_layer[i]["value"]] for i in layers},
    }
    result["layers_differ"] = len({tuple(v) for v in result["per_layer"].values()}) > 1
    return result


# ============================================================================================ statistics
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
            error += (part - recon).pow(2).sum().item()
            cos_sum += torch.nn.functional.cosine_similarity(recon, part, dim=-1).sum().item()
            count += part.shape[0]
        variance = (vectors - vectors.mean(0)).pow(2).sum().item()
        fvus.append(error / max(variance, 1e-12))
    return {"cos": cos_sum / max(count, 1), "fvu": sum(fvus) / len(fvus)}


@torch.no_grad()
def atom_usage(saes, x: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Code ``x [H, n, d]`` -> ``(indices [H, n, k], coefficients [H, n, k], counts [N])``: how many vectors
    select each atom (for per-head dictionaries the counts of all heads' dictionaries are added per index)."""
    indices, coefficients = [], []
    for h in range(x.shape[0]):
        sae = saes[h] if len(saes) > 1 else saes[0]
        parts = [sae.encode(part.float(), k) for part in x[h].split(chunk)]
        indices.append(torch.cat([p[0] for p in parts]))
        coefficients.append(torch.cat([p[1] for p in parts]).float())
    indices, coefficients = torch.stack(indices), torch.stack(coefficients)
    counts = torch.bincount(indices.reshape(-1).long(), minlength=saes[0].n_atoms)
    return indices, coefficients, counts


def usage_summary(counts: torch.Tensor) -> dict:
    """Dead atoms, usage entropy (bits; normalised by log2 N) and how many atoms carry half of all selections."""
    total = counts.sum().item()
    p = counts.double() / max(total, 1)
    nz = p[p > 0]
    entropy = float(-(nz * nz.log2()).sum())
    ordered = p.sort(descending=True).values.cumsum(0)
    return {
        "atoms": int(counts.numel()),
        "dead": int((counts == 0).sum()),
        "dead_fraction": float((counts == 0).double().mean()),
        "entropy_bits": entropy,
        "entropy_normalized": entropy / math.log2(counts.numel()),
        "effective_atoms": 2**entropy,
        "atoms_for_half_of_usage": int((ordered < 0.5).sum()) + 1,
        "top1_share": float(p.max()),
    }


# ============================================================================================ held-out vectors
def collect_heldout(model, tokenizer, dictionary: KVDictionary, config: AnalyzeConfig, text_path=None):
    """``(windows [n, C], {layer: (keys, values)})`` with keys/values ``[H, m, d]`` in the dictionary's key space
    (the windows evenly spaced over the text),
    sink positions dropped; vector ``j`` of head ``h`` is window ``j // (C - skip)``, position
    ``skip + j % (C - skip)``."""
    from .collect import iter_kv, token_windows
    from .embedded import wikipedia_text

    meta = dictionary.config
    text_path = text_path or wikipedia_text("eval")
    # windows spread evenly over (up to 32x as much of) the text, so that they cover many articles
    windows = token_windows(tokenizer, text_path, config.context, config.windows * SPREAD)
    if len(windows) == 0:
        raise ValueError(f"{text_path} has no {config.context}-token window")
    windows = windows[torch.linspace(0, len(windows) - 1, min(config.windows, len(windows))).round().long()]
    parts: dict[int, tuple[list, list]] = {i: ([], []) for i in meta.layer_indices}
    batches = iter_kv(model, windows, layers=meta.layer_indices, key_space=meta.key_space, per_head=True,
                      batch_windows=4, skip_first=config.skip_first)  # fmt: skip
    for batch in tqdm(batches, total=math.ceil(len(windows) / 4), desc="collect held-out keys/values",
                      disable=not config.progress):  # fmt: skip
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


# ============================================================================================ the analysis
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
    bar = tqdm(total=len(layers) * len(KINDS) * len(ks), desc="semantic elbow (layer x kind x k)",
               disable=not config.progress)  # fmt: skip
    for i in layers:
        curves[i] = {}
        for kind, x in zip(KINDS, vectors[i]):
            x = _subset(x, config.max_vectors, generator)
            curves[i][kind] = {"cos": [], "fvu": [], "vectors": int(x.shape[0] * x.shape[1])}
            for k in ks:
                stats = reconstruction_stats(dictionary[i].saes(kind), x, k)
                curves[i][kind]["cos"].append(stats["cos"])
                curves[i][kind]["fvu"].append(stats["fvu"])
                bar.update(1)
    bar.close()
    return curves


def atom_analysis(dictionary: KVDictionary, tokenizer, windows, vectors, layer: int, config: AnalyzeConfig) -> dict:
    """Usage statistics and the top atoms (with the tokens using them most strongly) of ``layer``."""
    meta = dictionary.config
    body = windows.shape[1] - config.skip_first
    result = {"layer": layer}
    for kind, x in zip(KINDS, vectors[layer]):
        k = meta.k_key if kind == "key" else meta.k_value
        indices, coefficients, counts = atom_usage(dictionary[layer].saes(kind), x, k)
        summary = usage_summary(counts)
        heads, n, _ = indices.shape
        flat_idx = indices.reshape(-1).long()
        flat_coef = coefficients.reshape(-1)
        vector_of = torch.arange(heads * n).repeat_interleave(k)  # selection -> (head * n + j)
        atoms = []
        for atom in counts.argsort(descending=True)[: config.top_atoms].tolist():
            if counts[atom] == 0:
                break
            selected = (flat_idx == atom).nonzero().flatten()
            vec = vector_of[selected]
            strength = flat_coef[selected].abs()
            tokens = windows[(vec % n) // body, config.skip_first + (vec % n) % body]
            token_counts = torch.bincount(tokens, minlength=1)
            frequent = token_counts.argsort(descending=True)[:5]
            examples, seen = [], set()
            for s in strength.argsort(descending=True).tolist():
                j = int(vec[s] % n)
                w, pos = j // body, config.skip_first + j % body
                token = int(windows[w, pos])
                if token in seen:
                    continue
                seen.add(token)
                left = tokenizer.decode(windows[w, max(0, pos - 8) : pos])
                examples.append({
                    "token": tokenizer.decode([token]), "context": _clean(left) + "[" + _clean(tokenizer.decode([token])) + "]",
                    "coefficient": round(float(flat_coef[selected[s]]), 4), "head": int(vec[s] // n),
                })  # fmt: skip
                if len(examples) >= config.examples:
                    break
            atoms.append({
                "atom": atom,
                "uses": int(counts[atom]),
                "share": float(counts[atom] / counts.sum()),
                "mean_abs_coefficient": float(strength.mean()),
                "distinct_tokens": int((token_counts > 0).sum()),
                "frequent_tokens": [[tokenizer.decode([int(t)]), int(token_counts[t])] for t in frequent
                                    if token_counts[t] > 0],  # fmt: skip
                "strongest": examples,
            })
        result[kind] = {"k": k, "vectors": heads * n, "usage": summary, "top_atoms": atoms,
                        "sorted_usage": counts.sort(descending=True).values.tolist()}  # fmt: skip
    return result


def _clean(text: str) -> str:
    return text.replace("\n", "⏎").replace("|", "¦").replace("`", "'")


def train_per_k(model, tokenizer, dictionary: KVDictionary, vectors, ks: list[int], config: AnalyzeConfig) -> dict:
    """Small dictionaries trained at each k (same N, key space, encoder) on the train split; their held-out
    cosine/FVU at that k. Slow: one training run per k."""
    from .embedded import wikipedia_text
    from .configs import TrainConfig
    from .training import train_dictionary

    meta = dictionary.config
    generator = torch.Generator().manual_seed(config.seed)
    out = {"ks": ks, "settings": {"max_tokens": config.train_tokens, "epochs": config.train_epochs}, "layers": {}}
    for k in tqdm(ks, desc="train per k", disable=not config.progress):
        train_config = TrainConfig(n_atoms=meta.n_atoms, k_key=k, k_value=k, key_space=meta.key_space,
                                   encoder=meta.encoder, per_head=meta.per_head, max_tokens=config.train_tokens,
                                   eval_tokens=1024, epochs=config.train_epochs, seed=config.seed,
                                   base_model=meta.base_model)  # fmt: skip
        text = config.train_text or wikipedia_text("train")
        trained = train_dictionary(model, tokenizer, text, train_config,
                                   Path(config.out) / "per_k" / f"k{k}", progress=config.progress)  # fmt: skip
        _with_encoder(trained, config.encoder)
        for i in meta.layer_indices:
            entry = out["layers"].setdefault(str(i), {kind: {"cos": [], "fvu": []} for kind in KINDS})
            for kind, x in zip(KINDS, vectors[i]):
                stats = reconstruction_stats(trained[i].saes(kind), _subset(x, config.max_vectors, generator), k)
                entry[kind]["cos"].append(stats["cos"])
                entry[kind]["fvu"].append(stats["fvu"])
    return out


def run_analysis(config: AnalyzeConfig, model=None, tokenizer=None, dictionary=None, text_path=None) -> dict:
    """Run every analysis and write ``results.json``, ``report.md`` and the plots to ``config.out``."""
    from .cache import check_model_fits
    from .embedded import load_model

    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, tokenizer = load_model(config.model, attn_implementation="sdpa")
    if dictionary is None:
        if config.dictionary is None:
            raise ValueError("analyze needs --dictionary (a trained dictionary folder or Hub id)")
        dictionary = KVDictionary.from_pretrained(config.dictionary)
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
        i: {kind: {"chord": elbow_chord(ks, curves[i][kind]["cos"]),
                   "gain": elbow_gain(ks, curves[i][kind]["cos"], config.gain_threshold)} for kind in KINDS}
        for i in layers
    }  # fmt: skip
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
            **{f"{kind}_cos_at_k{ref}": _mean([curves[i][kind]["cos"][r] for i in members]) for kind in KINDS},
            **{f"{kind}_fvu_at_k{ref}": _mean([curves[i][kind]["fvu"][r] for i in members]) for kind in KINDS},
            **{f"{kind}_cos_curve": [_mean([curves[i][kind]["cos"][j] for i in members]) for j in range(len(ks))]
               for kind in KINDS},
            **{f"{kind}_fvu_curve": [_mean([curves[i][kind]["fvu"][j] for i in members]) for j in range(len(ks))]
               for kind in KINDS},
        }
        for name, members in groups.items() if members
    }  # fmt: skip
    atoms = atom_analysis(dictionary, tokenizer, windows, vectors, layer, config)
    per_k = train_per_k(model, tokenizer, dictionary, vectors, ks, config) if config.train_per_k else None

    results = {
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "model": getattr(model.config, "_name_or_path", config.model),
        "dictionary": {"path": config.dictionary, **{k: v for k, v in asdict(meta).items()
                                                     if k not in ("training", "evaluation")}},  # fmt: skip
        "encoder": config.encoder or meta.encoder,
        "heldout": {"windows": int(windows.shape[0]), "context": int(windows.shape[1]),
                    "vectors_per_layer_kind": curves[layers[0]]["key"]["vectors"]},  # fmt: skip
        "ks": ks,
        "elbow_rule": "chord (Kneedle) on cosine vs log2(k), see sta_cache.analyze.elbow_chord",
        "layers": {str(i): {"group": next(g for g, m in groups.items() if i in m), **curves[i],
                            "elbow": elbows[i]} for i in layers},  # fmt: skip
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ============================================================================================ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_elbow(results: dict, path: Path) -> Path:
    plt = _pyplot()
    ks, layers = results["ks"], [int(i) for i in results["layers"]]
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    for col, kind in enumerate(KINDS):
        for row, metric in enumerate(("cos", "fvu")):
            ax = axes[row, col]
            for n, i in enumerate(layers):
                data = results["layers"][str(i)][kind]
                color = cmap(n / max(len(layers) - 1, 1))
                ax.plot(ks, data[metric], color=color, linewidth=0.9, alpha=0.8)
                e = results["layers"][str(i)]["elbow"][kind]["chord"]
                ax.scatter([e], [data[metric][ks.index(e)]], color=color, s=14, zorder=3)
            mean = [_mean([results["layers"][str(i)][kind][metric][j] for i in layers]) for j in range(len(ks))]
            ax.plot(ks, mean, color="black", linewidth=2, label="mean over layers")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{kind}s: {'reconstruction cosine' if metric == 'cos' else 'FVU'}")
            if metric == "fvu":
                ax.set_yscale("log")
            ax.set_xlabel("k (atoms per vector)")
            ax.legend(fontsize=8)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(min(layers), max(layers)))
    fig.colorbar(sm, ax=axes, label="layer", shrink=0.8)
    fig.suptitle("Semantic elbow (dots: detected elbow per layer)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_asymmetry(results: dict, path: Path) -> Path:
    plt = _pyplot()
    ks, layers = results["ks"], [int(i) for i in results["layers"]]
    ref = results["asymmetry"]["reference_k"]
    r = ks.index(ref)
    groups = results["asymmetry"]["groups"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    shades = {"shallow": "#e8f0fb", "middle": "#fdf3e3", "deep": "#eaf6ea"}
    for name, g in groups.items():
        ax.axvspan(min(g["layers"]) - 0.5, max(g["layers"]) + 0.5, color=shades[name], zorder=0)
        ax.text((min(g["layers"]) + max(g["layers"])) / 2, 1.0, name, ha="center", va="top", fontsize=8,
                transform=ax.get_xaxis_transform())  # fmt: skip
    for kind, color in zip(KINDS, ("tab:blue", "tab:red")):
        ax.plot(layers, [results["layers"][str(i)][kind]["cos"][r] for i in layers], "o-", color=color,
                markersize=3, label=f"{kind}s")  # fmt: skip
    ax.set_xlabel("layer")
    ax.set_ylabel(f"reconstruction cosine at k={ref}")
    ax.set_title(f"Key vs value reconstruction at k={ref}")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    colors = {"shallow": "tab:blue", "middle": "tab:orange", "deep": "tab:green"}
    for name, g in groups.items():
        ax.plot(ks, g["key_fvu_curve"], "-o", color=colors[name], markersize=3, label=f"{name} keys")
        ax.plot(ks, g["value_fvu_curve"], "--s", color=colors[name], markersize=3, label=f"{name} values")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("FVU (mean over group)")
    ax.set_title("FVU vs k by depth (solid keys, dashed values)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, alpha=0.3)
    ax = axes[2]
    for kind, color, offset in zip(KINDS, ("tab:blue", "tab:red"), (-0.2, 0.2)):
        ax.bar([i + offset for i in layers], [results["layers"][str(i)]["elbow"][kind]["chord"] for i in layers],
               width=0.4, color=color, label=f"{kind} elbow")  # fmt: skip
    ax.set_yscale("log", base=2)
    ax.set_yticks(ks, [str(k) for k in ks])
    ax.set_xlabel("layer")
    ax.set_ylabel("elbow k")
    ax.set_title("Detected elbow per layer")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Key-value asymmetry across depth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_atom_usage(results: dict, path: Path) -> Path:
    plt = _pyplot()
    atoms = results["atoms"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, color in zip(KINDS, ("tab:blue", "tab:red")):
        usage = atoms[kind]["sorted_usage"]
        total = max(sum(usage), 1)
        live = [u / total for u in usage if u > 0]
        u = atoms[kind]["usage"]
        ax.plot(range(1, len(live) + 1), live, color=color,
                label=f"{kind}s (k={atoms[kind]['k']}): {u['dead']} dead of {u['atoms']}, "
                      f"entropy {u['entropy_normalized']:.2f}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("atom rank")
    ax.set_ylabel("share of selections")
    ax.set_title(f"Atom usage, layer {atoms['layer']} (held-out)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_k(results: dict, path: Path) -> Path:
    plt = _pyplot()
    ks, per_k = results["ks"], results["per_k"]
    layers = list(per_k["layers"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("cos", "fvu")):
        for kind, color in zip(KINDS, ("tab:blue", "tab:red")):
            truncated = [_mean([results["layers"][i][kind][metric][j] for i in layers]) for j in range(len(ks))]
            trained = [_mean([per_k["layers"][i][kind][metric][j] for i in layers]) for j in range(len(ks))]
            ax.plot(ks, truncated, "-o", color=color, markersize=3, label=f"{kind}s: trained dictionary, k atoms")
            ax.plot(ks, trained, "--s", color=color, markersize=3, label=f"{kind}s: trained at each k")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        if metric == "fvu":
            ax.set_yscale("log")
        ax.set_xlabel("k")
        ax.set_ylabel("mean over layers: " + ("cosine" if metric == "cos" else "FVU"))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Truncating one dictionary vs training one per k")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ============================================================================================ report
def render_report(results: dict) -> str:
    ks, cfg = results["ks"], results["config"]
    layers = list(results["layers"])
    s = results["suggested_budget"]
    ref = results["asymmetry"]["reference_k"]
    meta = results["dictionary"]
    held = results["heldout"]
    lines = [
        "# Dictionary analysis: semantic elbow, key-value asymmetry, semantic atoms",
        "",
        f"Model `{results['model']}`; dictionary `{meta['path']}`: N={meta['n_atoms']} atoms, "
        f"{'per-head' if meta['per_head'] else 'shared across KV heads'}, {meta['key_space']} keys, encoder "
        f"`{results['encoder']}`, trained budget k_key/k_value = {meta['k_key']}/{meta['k_value']}.",
        f"Held-out vectors: {held['windows']} windows x {held['context']} tokens spread over the eval Wikipedia split "
        f"(first {cfg['skip_first']} positions, kept dense by the cache, left out); up to "
        f"{held['vectors_per_layer_kind']} vectors per layer and kind. Curves code every vector with the trained "
        "dictionary and k atoms (truncation).",
        "",
        "## Semantic elbow",
        "",
        "![semantic elbow](" + results["plots"]["elbow"] + ")",
        "",
        "**Elbow rule** (`elbow_chord`): on reconstruction cosine vs log2(k), both axes scaled to [0, 1] between the "
        "first point and the best point, the elbow is the k farthest above the chord joining them (Kneedle). "
        f"Beside it, the gain rule (`elbow_gain`): the smallest k whose next doubling gains < {cfg['gain_threshold']} "
        "cosine. The suggested budget is the upper median of the per-layer chord elbows (it stays on the k grid).",
        "",
        f"**Suggested dual budget: k_key = {s['k_key']}, k_value = {s['k_value']}** "
        f"(gain rule: {s['gain_rule']['k_key']}/{s['gain_rule']['k_value']}).",
        "",
        "| depth group | k_key | k_value | gain rule k_key/k_value |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, b in s["by_group"].items():
        g = s["gain_rule"]["by_group"][name]
        lines.append(f"| {name} | {b['k_key']} | {b['k_value']} | {g['k_key']}/{g['k_value']} |")
    if s["layers_differ"]:
        lines += ["", "Layers differ; per-layer budget (k_key/k_value) by the chord rule: "
                  + ", ".join(f"L{i}: {v[0]}/{v[1]}" for i, v in s["per_layer"].items()) + "."]  # fmt: skip
    lines += [
        "",
        "Per layer: cosine (FVU) at each k, and the detected elbows.",
        "",
        "| layer | group | kind | " + " | ".join(f"k={k}" for k in ks) + " | elbow (chord) | elbow (gain) |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in ks) + " | ---: | ---: |",
    ]
    for i in layers:
        data = results["layers"][i]
        for kind in KINDS:
            cells = " | ".join(f"{c:.3f} ({f:.3f})" for c, f in zip(data[kind]["cos"], data[kind]["fvu"]))
            lines.append(f"| {i} | {data['group']} | {kind} | {cells} | {data['elbow'][kind]['chord']} "
                         f"| {data['elbow'][kind]['gain']} |")  # fmt: skip
    lines += [
        "",
        "## Key-value asymmetry across depth",
        "",
        "![asymmetry](" + results["plots"]["asymmetry"] + ")",
        "",
        f"| group | layers | key cosine @k={ref} | value cosine @k={ref} | key FVU @k={ref} | value FVU @k={ref} |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, g in results["asymmetry"]["groups"].items():
        lines.append(
            f"| {name} | {min(g['layers'])}-{max(g['layers'])} | {g[f'key_cos_at_k{ref}']:.3f} "
            f"| {g[f'value_cos_at_k{ref}']:.3f} | {g[f'key_fvu_at_k{ref}']:.3f} | {g[f'value_fvu_at_k{ref}']:.3f} |"
        )
    atoms = results["atoms"]
    lines += ["", f"## Semantic atoms of layer {atoms['layer']}", "",
              "![atom usage](" + results["plots"]["atoms"] + ")", "",
              "| kind | k | vectors | dead atoms | usage entropy (bits, / log2 N) | effective atoms "
              "| atoms carrying half the usage | top atom share |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for kind in KINDS:
        u, a = atoms[kind]["usage"], atoms[kind]
        lines.append(f"| {kind} | {a['k']} | {a['vectors']} | {u['dead']} / {u['atoms']} | {u['entropy_bits']:.2f} "
                     f"({u['entropy_normalized']:.3f}) | {u['effective_atoms']:.0f} | {u['atoms_for_half_of_usage']} "
                     f"| {u['top1_share']:.3f} |")  # fmt: skip
    for kind in KINDS:
        lines += ["", f"Most used {kind} atoms (share of selections; frequent tokens; strongest uses in context, "
                  "the token in brackets):", "",
                  "| atom | share | distinct tokens | frequent tokens | strongest uses |",
                  "| ---: | ---: | ---: | --- | --- |"]  # fmt: skip
        for atom in atoms[kind]["top_atoms"]:
            frequent = ", ".join(f"`{_clean(t).strip() or repr(t)}` {c}" for t, c in atom["frequent_tokens"])
            strongest = "<br>".join(f"`{e['context'][-60:]}` ({e['coefficient']:+.2f})" for e in atom["strongest"])
            lines.append(f"| {atom['atom']} | {atom['share']:.3f} | {atom['distinct_tokens']} | {frequent} "
                         f"| {strongest} |")  # fmt: skip
    if results.get("per_k"):
        pk = results["per_k"]
        lines += ["", "## Truncation vs dictionaries trained at each k", "",
                  "![per k](" + results["plots"]["per_k"] + ")", "",
                  f"Per-k dictionaries: {pk['settings']['max_tokens']} training tokens, "
                  f"{pk['settings']['epochs']} epochs each (smaller than the main dictionary's training, so the "
                  "comparison favours truncation where the main dictionary saw more data).", "",
                  "| kind | " + " | ".join(f"k={k}" for k in ks) + " |", "| --- | " + " | ".join("---:" for _ in ks) + " |"]  # fmt: skip
        for kind in KINDS:
            trained = [_mean([pk["layers"][i][kind]["cos"][j] for i in layers]) for j in range(len(ks))]
            truncated = [_mean([results["layers"][i][kind]["cos"][j] for i in layers]) for j in range(len(ks))]
            lines.append(f"| {kind} cosine, truncated | " + " | ".join(f"{v:.3f}" for v in truncated) + " |")
            lines.append(f"| {kind} cosine, trained at k | " + " | ".join(f"{v:.3f}" for v in trained) + " |")
    lines += ["", f"Run time: {results.get('seconds', 0)} s.", ""]
    return "\n".join(lines)
