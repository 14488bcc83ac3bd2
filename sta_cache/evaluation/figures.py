"""The figures of ``sta-cache eval`` (quality vs bytes) and ``sta-cache analyze`` (elbow, asymmetry, atom usage,
truncation vs per-k training), drawn from their ``results`` dictionaries. matplotlib is imported when drawing."""

from __future__ import annotations

from pathlib import Path

from ..configs import EvalConfig
from ..dictionary import KINDS
from ..metrics import average

OFF_SCALE_RATIO = 1.25  # pareto.png: perplexity ratios above this are drawn on the top edge

__all__ = ["plot_asymmetry", "plot_atom_usage", "plot_elbow", "plot_pareto", "plot_per_k", "pyplot"]


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(rows: list[dict], path: Path, config: EvalConfig) -> None:
    """Perplexity ratio vs dense against bytes per token (log x), with the Pareto frontier."""
    plt = pyplot()
    points = [r for r in rows if r["available"] and r.get("perplexity_ratio") is not None]
    colors = {"dynamic": "black", "sta": "tab:blue", "quantized": "tab:orange"}
    markers = {"dynamic": "s", "sta": "o", "quantized": "^"}
    # A collapsed baseline (quanto int2 is x12) would squash every useful point onto the line y = 1: rows above
    # the cap are drawn on the top edge with their value in the label.
    ceiling = min(max((r["perplexity_ratio"] for r in points), default=1.0), OFF_SCALE_RATIO)
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for n, row in enumerate(sorted(points, key=lambda r: r["bytes"]["per_token"])):
        x, ratio = row["bytes"]["per_token"], row["perplexity_ratio"]
        off_scale = ratio > ceiling
        label = row["name"].replace("QuantizedCache ", "Q-") + (f" (x{ratio:.1f}, off scale)" if off_scale else "")
        y = ceiling if off_scale else ratio
        ax.scatter(
            x,
            y,
            c=colors[row["family"]],
            marker="^" if off_scale else markers[row["family"]],
            s=50,
            zorder=3,
            clip_on=False,
        )
        offset = (7, -10 if off_scale else (-12, 5, -4, 12)[n % 4])  # staggered so neighbouring labels overlap less
        ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=7)
    frontier, best = [], float("inf")
    for row in sorted(points, key=lambda r: (r["bytes"]["per_token"], r["perplexity_ratio"])):
        if row["perplexity_ratio"] < best:
            frontier.append(row)
            best = row["perplexity_ratio"]
    if len(frontier) > 1:
        ax.step(
            [r["bytes"]["per_token"] for r in frontier],
            [min(r["perplexity_ratio"], ceiling) for r in frontier],
            where="post",
            color="gray",
            linestyle="--",
            linewidth=1,
            label="Pareto frontier",
        )
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xscale("log")
    low = min((r["perplexity_ratio"] for r in points), default=1.0)
    margin = 0.05 * (ceiling - min(low, 1.0)) + 1e-3
    ax.set_ylim(min(low, 1.0) - margin, ceiling + margin)
    ax.set_xlabel("bytes per token (real stored tensors, log scale)")
    ax.set_ylabel("perplexity / DynamicCache perplexity")
    ax.set_title(f"Quality vs memory (STA window {config.residual_length} + {config.num_sink_tokens} sinks)")
    for family, color in colors.items():
        ax.scatter([], [], c=color, marker=markers[family], label=family)
    missing = [r["name"] for r in rows if not r["available"]]
    if missing:
        fig.text(0.01, 0.01, "unavailable: " + ", ".join(missing), fontsize=7, color="gray")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_elbow(results: dict, path: Path) -> Path:
    plt = pyplot()
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
            mean = [average([results["layers"][str(i)][kind][metric][j] for i in layers]) for j in range(len(ks))]
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
    plt = pyplot()
    ks, layers = results["ks"], [int(i) for i in results["layers"]]
    ref = results["asymmetry"]["reference_k"]
    r = ks.index(ref)
    groups = results["asymmetry"]["groups"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    shades = {"shallow": "#e8f0fb", "middle": "#fdf3e3", "deep": "#eaf6ea"}
    for name, g in groups.items():
        ax.axvspan(min(g["layers"]) - 0.5, max(g["layers"]) + 0.5, color=shades[name], zorder=0)
        ax.text(
            (min(g["layers"]) + max(g["layers"])) / 2,
            1.0,
            name,
            ha="center",
            va="top",
            fontsize=8,
            transform=ax.get_xaxis_transform(),
        )
    for kind, color in zip(KINDS, ("tab:blue", "tab:red"), strict=True):
        ax.plot(
            layers,
            [results["layers"][str(i)][kind]["cos"][r] for i in layers],
            "o-",
            color=color,
            markersize=3,
            label=f"{kind}s",
        )
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
    for kind, color, offset in zip(KINDS, ("tab:blue", "tab:red"), (-0.2, 0.2), strict=True):
        ax.bar(
            [i + offset for i in layers],
            [results["layers"][str(i)]["elbow"][kind]["chord"] for i in layers],
            width=0.4,
            color=color,
            label=f"{kind} elbow",
        )
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
    plt = pyplot()
    atoms = results["atoms"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, color in zip(KINDS, ("tab:blue", "tab:red"), strict=True):
        usage = atoms[kind]["sorted_usage"]
        total = max(sum(usage), 1)
        live = [u / total for u in usage if u > 0]
        u = atoms[kind]["usage"]
        ax.plot(
            range(1, len(live) + 1),
            live,
            color=color,
            label=f"{kind}s (k={atoms[kind]['k']}): {u['dead']} dead of {u['atoms']}, "
            f"entropy {u['entropy_normalized']:.2f}",
        )
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
    plt = pyplot()
    ks, per_k = results["ks"], results["per_k"]
    layers = list(per_k["layers"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("cos", "fvu"), strict=True):
        for kind, color in zip(KINDS, ("tab:blue", "tab:red"), strict=True):
            truncated = [average([results["layers"][i][kind][metric][j] for i in layers]) for j in range(len(ks))]
            trained = [average([per_k["layers"][i][kind][metric][j] for i in layers]) for j in range(len(ks))]
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
