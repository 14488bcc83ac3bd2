"""The Semantic Elbow: where reconstruction quality against k stops paying, per layer, and the budget it suggests.

See :func:`elbow_chord` (the rule used) and :func:`elbow_gain` (reported beside it); :func:`suggest_budget` turns
per-layer elbows into one dual budget ``(k_key, k_value)``, one per depth group and one per layer.
"""

from __future__ import annotations

import math

GROUP_NAMES = ("shallow", "middle", "deep")

__all__ = ["GROUP_NAMES", "depth_groups", "elbow_chord", "elbow_gain", "suggest_budget"]


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
            name: {
                "k_key": _upper_median([per_layer[i]["key"] for i in members]),
                "k_value": _upper_median([per_layer[i]["value"] for i in members]),
            }
            for name, members in groups.items()
            if members
        },
        "per_layer": {str(i): [per_layer[i]["key"], per_layer[i]["value"]] for i in layers},
    }
    result["layers_differ"] = len({tuple(v) for v in result["per_layer"].values()}) > 1
    return result
