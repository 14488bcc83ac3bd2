"""``report.md`` of ``sta-cache analyze``: elbow table and budget, key-value asymmetry, semantic atoms."""

from __future__ import annotations

from ..dictionary import KINDS
from ..metrics import average
from .atoms import clean

__all__ = ["render_report"]


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
        lines += [
            "",
            "Layers differ; per-layer budget (k_key/k_value) by the chord rule: "
            + ", ".join(f"L{i}: {v[0]}/{v[1]}" for i, v in s["per_layer"].items())
            + ".",
        ]
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
            cells = " | ".join(f"{c:.3f} ({f:.3f})" for c, f in zip(data[kind]["cos"], data[kind]["fvu"], strict=True))
            lines.append(
                f"| {i} | {data['group']} | {kind} | {cells} | {data['elbow'][kind]['chord']} "
                f"| {data['elbow'][kind]['gain']} |"
            )
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
    lines += [
        "",
        f"## Semantic atoms of layer {atoms['layer']}",
        "",
        "![atom usage](" + results["plots"]["atoms"] + ")",
        "",
        "| kind | k | vectors | dead atoms | usage entropy (bits, / log2 N) | effective atoms "
        "| atoms carrying half the usage | top atom share |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in KINDS:
        u, a = atoms[kind]["usage"], atoms[kind]
        lines.append(
            f"| {kind} | {a['k']} | {a['vectors']} | {u['dead']} / {u['atoms']} | {u['entropy_bits']:.2f} "
            f"({u['entropy_normalized']:.3f}) | {u['effective_atoms']:.0f} | {u['atoms_for_half_of_usage']} "
            f"| {u['top1_share']:.3f} |"
        )
    for kind in KINDS:
        lines += [
            "",
            f"Most used {kind} atoms (share of selections; frequent tokens; strongest uses in context, "
            "the token in brackets):",
            "",
            "| atom | share | distinct tokens | frequent tokens | strongest uses |",
            "| ---: | ---: | ---: | --- | --- |",
        ]
        for atom in atoms[kind]["top_atoms"]:
            frequent = ", ".join(f"`{clean(t).strip() or repr(t)}` {c}" for t, c in atom["frequent_tokens"])
            strongest = "<br>".join(f"`{e['context'][-60:]}` ({e['coefficient']:+.2f})" for e in atom["strongest"])
            lines.append(
                f"| {atom['atom']} | {atom['share']:.3f} | {atom['distinct_tokens']} | {frequent} | {strongest} |"
            )
    if results.get("per_k"):
        pk = results["per_k"]
        lines += [
            "",
            "## Truncation vs dictionaries trained at each k",
            "",
            "![per k](" + results["plots"]["per_k"] + ")",
            "",
            f"Per-k dictionaries: {pk['settings']['max_tokens']} training tokens, "
            f"{pk['settings']['epochs']} epochs each (smaller than the main dictionary's training, so the "
            "comparison favours truncation where the main dictionary saw more data).",
            "",
            "| kind | " + " | ".join(f"k={k}" for k in ks) + " |",
            "| --- | " + " | ".join("---:" for _ in ks) + " |",
        ]
        for kind in KINDS:
            trained = [average([pk["layers"][i][kind]["cos"][j] for i in layers]) for j in range(len(ks))]
            truncated = [average([results["layers"][i][kind]["cos"][j] for i in layers]) for j in range(len(ks))]
            lines.append(f"| {kind} cosine, truncated | " + " | ".join(f"{v:.3f}" for v in truncated) + " |")
            lines.append(f"| {kind} cosine, trained at k | " + " | ".join(f"{v:.3f}" for v in trained) + " |")
    lines += ["", f"Run time: {results.get('seconds', 0)} s.", ""]
    return "\n".join(lines)
