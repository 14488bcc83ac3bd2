"""Held-out quality of trained dictionaries: FVU and cosine of their reconstructions, per layer and kind.

Used during training (the stacked SAEs, logged to ``train_log.jsonl`` and summarised in ``evaluation.json``) and on
a finished :class:`~sta_cache.dictionary.KVDictionary` (:func:`evaluate_dictionary`), with either encoder.
"""

from __future__ import annotations

import torch

from ..configs import Encoder
from ..dictionary import KINDS, KVDictionary
from ..kernels.dispatch import encode, resolve_backend
from ..metrics import fraction_of_variance_unexplained, mean_cosine
from .sae import StackedTopKSAE

__all__ = ["evaluate_dictionary", "evaluate_stack", "omp_codes", "reconstruct", "summary"]


def omp_codes(x: torch.Tensor, atoms: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP codes ``(indices [n, k], coefficients [n, k])`` of ``x [n, d]`` over ``atoms [N, d]`` and ``bias [d]``,
    by the fastest kernel for ``x``'s device (the fused C kernel on the CPU)."""
    return encode(x, {"W_dec": atoms, "b_dec": bias}, k, "omp", resolve_backend("auto", x.device, x.shape[-1]))


@torch.no_grad()
def reconstruct(W_enc, b_enc, W_dec, b_dec, x: torch.Tensor, k: int, encoder: Encoder) -> torch.Tensor:
    """``x [M, d]`` coded with ``k`` atoms by one SAE's weights and decoded again."""
    if encoder == "omp":
        idx, coef = omp_codes(x, W_dec, b_dec, k)
    elif W_enc is None:
        raise ValueError("encoder='topk' needs the SAE's encoder, and a matching-pursuit dictionary holds none")
    else:
        pre = (x - b_dec) @ W_enc + b_enc
        values, idx = pre.topk(k, dim=-1)
        coef = values.relu()
    return torch.einsum("mk,mkd->md", coef.float(), W_dec[idx]) + b_dec


@torch.no_grad()
def _stats(x: torch.Tensor, recon: torch.Tensor) -> tuple[float, float]:
    """(FVU, mean cosine) of reconstructions of ``x [M, d]``."""
    return fraction_of_variance_unexplained(x, recon).item(), mean_cosine(recon, x).item()


@torch.no_grad()
def evaluate_stack(sae: StackedTopKSAE, x: torch.Tensor, encoder: Encoder, chunk: int = 1024) -> tuple[list, list]:
    """Held-out FVU and cosine of every stacked dictionary on ``x [S, E, d]``."""
    fvu, cos = [], []
    for s in range(sae.S):
        k = int(sae.ks[s])
        weights = (sae.W_enc[s], sae.b_enc[s], sae.W_dec[s], sae.b_dec[s])
        recon = torch.cat([reconstruct(*weights, part, k, encoder) for part in x[s].split(chunk)])
        f, c = _stats(x[s], recon)
        fvu.append(f)
        cos.append(c)
    return fvu, cos


@torch.no_grad()
def evaluate_dictionary(
    dictionary: KVDictionary,
    vectors: dict[int, tuple[torch.Tensor, torch.Tensor]],
    *,
    encoder: Encoder | None = None,
    k_key: int | None = None,
    k_value: int | None = None,
) -> dict[int, dict[str, dict[str, float]]]:
    """FVU and cosine of ``dictionary`` on held-out vectors ``{layer: (keys, values)}`` as
    :func:`~sta_cache.collect.iter_kv` yields them (``[Hd, n, d]``) -> ``{layer: {"key": {"fvu", "cos"},
    "value": {...}}}`` (means over heads)."""
    meta = dictionary.config
    encoder = encoder or meta.encoder
    ks = {"key": k_key or meta.k_key, "value": k_value or meta.k_value}
    out: dict[int, dict[str, dict[str, float]]] = {}
    for layer, pair in vectors.items():
        out[layer] = {}
        for kind, x in zip(KINDS, pair, strict=True):
            stats = []
            for h, sae in enumerate(dictionary[layer].saes(kind)):
                recon = reconstruct(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, x[h].float(), ks[kind], encoder)
                stats.append(_stats(x[h].float(), recon))
            out[layer][kind] = {
                "fvu": sum(s[0] for s in stats) / len(stats),
                "cos": sum(s[1] for s in stats) / len(stats),
            }
    return out


def summary(per_layer: dict, prefix: str) -> dict[str, float | int]:
    """Means over layers and the worst layer, per kind, of ``{layer: {kind: {"cos", "fvu"}}}``."""
    out: dict[str, float | int] = {}
    for kind in KINDS:
        cos = {int(layer): stats[kind]["cos"] for layer, stats in per_layer.items()}
        fvu = {int(layer): stats[kind]["fvu"] for layer, stats in per_layer.items()}
        worst = min(cos, key=cos.get)
        out[f"{kind}_cosine_{prefix}"] = round(sum(cos.values()) / len(cos), 4)
        out[f"{kind}_fvu_{prefix}"] = round(sum(fvu.values()) / len(fvu), 4)
        out[f"{kind}_cosine_{prefix}_worst"] = round(cos[worst], 4)
        out[f"{kind}_worst_layer_{prefix}"] = worst
    return out
