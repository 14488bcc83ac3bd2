"""The figures of ``sta-cache eval`` (quality vs bytes) and ``sta-cache analyze`` (elbow, asymmetry, atom usage,
truncation vs per-k training), drawn from their ``results`` dictionaries. matplotlib is imported when drawing."""

from __future__ import annotations

from pathlib import Path

from ..configs import EvalConfig
from ..dictionary import KINDS
from ..metrics import average

OFF_SCALE_RATIO = 1.25  # pareto.png: perplexity ratios above this are drawn on the top edge
COLORS = {
    "dynamic": "black",
    "sta": "tab:blue",
    "rotated": "tab:green",
    "kivi": "tab:purple",
    "quantized": "tab:orange",
}
MARKERS = {"dynamic": "s", "sta": "o", "rotated": "D", "kivi": "v", "quantized": "^"}
BIT_TICKS = (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)
# Where a label may go around its point, in points: (dx, dy, horizontal alignment), tried in this order.
LABEL_OFFSETS = [
    (dx, dy, "left" if dx >= 0 else "right") for dy in (2, -9, 10, -17, 18, -25, 26, -33, 34, -41) for dx in (6, -6)
]
# Where a number standing for a label that fits nowhere may go: short, so also further to the sides.
NUMBER_OFFSETS = LABEL_OFFSETS + [
    (dx, dy, "left" if dx >= 0 else "right") for dy in (2, -9, 10, -17) for dx in (14, -14, 24, -24, 34, -34)
]

__all__ = [
    "place_labels",
    "plot_amortised",
    "plot_asymmetry",
    "plot_atom_usage",
    "plot_elbow",
    "plot_pareto",
    "plot_per_k",
    "pyplot",
]


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def place_labels(ax, points: list[tuple[float, float, str]]) -> list:
    """Write each ``(x, y, label)`` beside its point at the first of :data:`LABEL_OFFSETS` where it overlaps no
    label placed before, no point and does not leave the axes; a label that fits nowhere is replaced by a number
    placed the same way, listed under the axes. Returns the labels' display boxes (with 2 px of air)."""
    from matplotlib.transforms import Bbox

    ax.figure.canvas.draw()  # the transforms and text sizes the placement reads
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    radius = 4 * ax.figure.dpi / 72  # half a marker, in pixels
    taken = [
        Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)
        for x, y in ax.transData.transform([(x, y) for x, y, _ in points])
    ]

    def measure(x: float, y: float, label: str, offset: tuple, leader: bool = False):
        """Write ``label`` at ``offset``; its text's box (a leader line, if any, is not part of it)."""
        dx, dy, align = offset
        text = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, ha=align)
        box = text.get_window_extent(renderer).padded(2)  # a little air between labels
        if leader:
            text.remove()
            ax.annotate(
                label,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=7,
                ha=align,
                arrowprops=dict(arrowstyle="-", color="gray", linewidth=0.5),
            )
        return text, box

    def place(x: float, y: float, label: str, offsets: list) -> tuple:
        """The first offset free of other boxes and inside the axes, else the one overlapping the fewest boxes."""
        best = (len(taken) + 2, offsets[0])
        for offset in offsets:
            text, box = measure(x, y, label, offset)
            text.remove()
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            overlaps = sum(box.overlaps(other) for other in taken) + (not inside)
            if not overlaps:
                return True, offset
            best = min(best, (overlaps, offset), key=lambda pair: pair[0])
        return False, best[1]

    boxes, key = [], []
    for x, y, label in points:
        fits, offset = place(x, y, label, LABEL_OFFSETS)
        if not fits:
            key.append(f"{len(key) + 1}: {label}")
            label = str(len(key))
            _, offset = place(x, y, label, NUMBER_OFFSETS)
        _, box = measure(x, y, label, offset, leader=abs(offset[0]) > 10 or abs(offset[1]) > 10)
        taken.append(box)
        boxes.append(box)
    if key:
        ax.text(0, -0.16, "; ".join(key), transform=ax.transAxes, fontsize=6, va="top", wrap=True)
    return boxes


def _quality_axes(ax, rows: list[dict], x_of, xlabel: str, title: str) -> list[tuple[float, float, str]]:
    """Perplexity ratio against ``x_of(row)`` bits per element (log x), a point per measured row (the rotation
    seeds' range as an error bar) and the Pareto frontier; returns the points' labels for :func:`place_labels`
    (placed once the figure's layout is final)."""
    points = [r for r in rows if r["available"] and r.get("ppl_ratio") is not None]
    # A collapsed baseline (quanto int2 is x12) would squash every useful point onto the line y = 1: rows above
    # the cap are drawn on the top edge with their value in the label.
    ceiling = min(max((r["ppl_ratio"] for r in points), default=1.0), OFF_SCALE_RATIO)
    low = min(
        [r["ppl_ratio"] for r in points] + [s["ppl_ratio"] for r in points for s in r.get("per_seed", ())] + [1.0]
    )
    margin = 0.05 * (ceiling - low) + 1e-3
    ax.set_ylim(low - margin, ceiling + margin)
    xs = [x_of(r) for r in points]
    ax.set_xscale("log")
    ax.set_xlim(min(xs, default=1) / 1.25, max(xs, default=32) * 1.25)
    ticks = [t for t in BIT_TICKS if min(xs, default=1) / 1.25 <= t <= max(xs, default=32) * 1.25]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    labelled = []
    for row, x in sorted(zip(points, xs, strict=True), key=lambda pair: pair[1]):
        ratio, family = row["ppl_ratio"], row["family"]
        off_scale = ratio > ceiling
        y = ceiling if off_scale else ratio
        marker = "^" if off_scale else MARKERS[family]
        ax.scatter(x, y, c=COLORS[family], marker=marker, s=40, zorder=3, clip_on=False)
        seeds = [s["ppl_ratio"] for s in row.get("per_seed", ())]
        if seeds and not off_scale:
            ax.plot([x, x], [min(seeds), min(max(seeds), ceiling)], color=COLORS[family], linewidth=1, zorder=2)
        name = row["name"].replace("QuantizedCache ", "Q-").replace(" (sta)", "")
        labelled.append((x, y, name + (f" (x{ratio:.1f}, off scale)" if off_scale else "")))
    frontier, best = [], float("inf")
    for row, x in sorted(zip(points, xs, strict=True), key=lambda pair: (pair[1], pair[0]["ppl_ratio"])):
        if row["ppl_ratio"] < best:
            frontier.append((x, min(row["ppl_ratio"], ceiling)))
            best = row["ppl_ratio"]
    if len(frontier) > 1:
        ax.step(*zip(*frontier, strict=True), where="post", color="gray", linestyle="--", linewidth=1, label="frontier")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity / DynamicCache perplexity")
    ax.set_title(title, fontsize=10)
    for family in sorted({r["family"] for r in points}, key=list(COLORS).index):
        ax.scatter([], [], c=COLORS[family], marker=MARKERS[family], label=family)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, which="major", alpha=0.3)
    return labelled


def _unavailable_note(fig, rows: list[dict]) -> None:
    missing = [r["name"] for r in rows if not r["available"]]
    if missing:
        fig.text(0.01, 0.005, "unavailable: " + ", ".join(missing), fontsize=7, color="gray")


def plot_pareto(rows: list[dict], path: Path, config: EvalConfig) -> None:
    """Perplexity ratio vs dense against bits per element of the compressed tokens (log x), with the Pareto
    frontier."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)  # drawn at the saved resolution: text sizes as placed
    labelled = _quality_axes(
        ax,
        rows,
        lambda row: row["bits_per_element"],
        "bits per element of a compressed token (all stored bytes: codes, scales, indices, positions; log scale)",
        f"Quality vs memory (dense window {config.residual_length} + {config.num_sink_tokens} sinks for STA, "
        "rotated and KIVI; bars: rotation seeds)",
    )
    _unavailable_note(fig, rows)
    fig.tight_layout()
    place_labels(ax, labelled)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_amortised(rows: list[dict], path: Path, config: EvalConfig) -> None:
    """:func:`plot_pareto` with the fixed bytes (STA dictionaries, rotations and codebooks) amortised over one
    sequence (batch 1) of each context in the rows' ``amortised_bits_per_element``, one panel each."""
    plt = pyplot()
    contexts = next((list(r["bytes"]["amortised_bits_per_element"]) for r in rows if r.get("ppl_ratio")), [])
    panels = max(len(contexts), 1)
    fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 6.5), dpi=110, squeeze=False)
    labelled = [
        _quality_axes(
            ax,
            rows,
            lambda row, context=context: row["bytes"]["amortised_bits_per_element"][context],
            f"bits per element with the fixed bytes spread over {int(context):,} tokens (batch 1; log scale)",
            f"Dictionaries amortised over a {int(context):,}-token sequence",
        )
        for ax, context in zip(axes[0], contexts, strict=False)
    ]
    _unavailable_note(fig, rows)
    fig.tight_layout()
    for ax, points in zip(axes[0], labelled, strict=False):
        place_labels(ax, points)
    fig.savefig(path, dpi=110)
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
