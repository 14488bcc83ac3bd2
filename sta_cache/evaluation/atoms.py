"""Semantic atoms: how often each atom of a dictionary is chosen, and the tokens that choose it most strongly."""

from __future__ import annotations

import math

import torch

from ..configs import AnalyzeConfig
from ..dictionary import KINDS, KVDictionary

__all__ = ["atom_analysis", "atom_usage", "clean", "usage_summary"]


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


def atom_analysis(dictionary: KVDictionary, tokenizer, windows, vectors, layer: int, config: AnalyzeConfig) -> dict:
    """Usage statistics and the top atoms (with the tokens using them most strongly) of ``layer``."""
    meta = dictionary.config
    body = windows.shape[1] - config.skip_first
    result = {"layer": layer}
    for kind, x in zip(KINDS, vectors[layer], strict=True):
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
                text = tokenizer.decode([token])
                examples.append(
                    {
                        "token": text,
                        "context": clean(left) + "[" + clean(text) + "]",
                        "coefficient": round(float(flat_coef[selected[s]]), 4),
                        "head": int(vec[s] // n),
                    }
                )
                if len(examples) >= config.examples:
                    break
            atoms.append(
                {
                    "atom": atom,
                    "uses": int(counts[atom]),
                    "share": float(counts[atom] / counts.sum()),
                    "mean_abs_coefficient": float(strength.mean()),
                    "distinct_tokens": int((token_counts > 0).sum()),
                    "frequent_tokens": [
                        [tokenizer.decode([int(t)]), int(token_counts[t])] for t in frequent if token_counts[t] > 0
                    ],
                    "strongest": examples,
                }
            )
        result[kind] = {
            "k": k,
            "vectors": heads * n,
            "usage": summary,
            "top_atoms": atoms,
            "sorted_usage": counts.sort(descending=True).values.tolist(),
        }
    return result


def clean(text: str) -> str:
    return text.replace("\n", "⏎").replace("|", "¦").replace("`", "'")
