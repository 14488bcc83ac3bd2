"""Dictionary learning for matching-pursuit codes: the Method of Optimal Directions (Engan et al. 1999).

The cache codes vectors by orthogonal matching pursuit over the decoder, so the decoder should be learned with
the same pursuit as its inner step rather than through an encoder that inference never uses. Each MOD iteration
codes the training vectors with OMP, then refits all atoms at once by least squares,
``D = argmin ||X - C D||^2 = (C^T C)^-1 C^T X``, renormalises them, and re-seeds unused atoms with the
worst-reconstructed vectors.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from ..collect import iter_kv, rotary_for_layer, token_windows
from ..configs import PursuitConfig
from ..dictionary import KINDS, KVDictionary, KVDictionaryConfig
from ..geometry import compressible_layers, kv_geometry
from ..kernels.reference import omp_encode_reference
from ..metrics import fraction_of_variance_unexplained
from .heldout import reconstruct

__all__ = ["learn_pursuit_dictionary", "mod_step", "omp_reconstruct", "train_pursuit_dictionary"]


def _codes_matrix(indices: torch.Tensor, coefficients: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """Sparse codes ``[n, k]`` as a dense ``[n, N]`` coefficient matrix."""
    dense = torch.zeros(indices.shape[0], n_atoms, dtype=torch.float32)
    return dense.scatter_add_(1, indices, coefficients.float())


def omp_reconstruct(x: torch.Tensor, atoms: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """``x [n, d]`` coded with ``k`` atoms by OMP over ``atoms [N, d]`` and ``bias [d]``, and decoded again."""
    return reconstruct(None, None, atoms, bias, x, k, "omp")


def mod_step(x: torch.Tensor, atoms: torch.Tensor, bias: torch.Tensor, k: int, ridge: float = 1e-4):
    """One MOD iteration on training vectors ``x [n, d]``; returns ``(atoms [N, d], bias [d], train FVU)``."""
    n_atoms = atoms.shape[0]
    indices, coefficients = omp_encode_reference(x, atoms, bias, k)
    codes = _codes_matrix(indices, coefficients, n_atoms)
    gram = codes.T @ codes
    usage = gram.diagonal().clone()
    gram.diagonal().add_(ridge * usage.mean().clamp_min(1e-6))
    new_atoms = torch.linalg.solve(gram, codes.T @ (x - bias))
    reconstruction = codes @ new_atoms + bias
    fvu = fraction_of_variance_unexplained(x, reconstruction).item()
    bias = bias + (x - reconstruction).mean(0)
    unused = usage <= 0
    if unused.any():  # re-seed dead atoms with the directions of the worst-coded vectors
        errors = (x - reconstruction).pow(2).sum(-1)
        worst = errors.topk(int(unused.sum())).indices
        new_atoms[unused] = (x - reconstruction)[worst]
    norms = new_atoms.norm(dim=-1, keepdim=True)
    new_atoms = torch.where(norms > 1e-8, new_atoms / norms.clamp_min(1e-8), atoms)
    return new_atoms, bias, fvu


def learn_pursuit_dictionary(
    x: torch.Tensor,
    atoms: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    iterations: int = 5,
    progress: bool = False,
    desc: str = "MOD",
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Refine ``atoms [N, d]`` / ``bias [d]`` for k-sparse OMP codes of ``x [n, d]``; returns the per-iteration
    training FVU too."""
    history = []
    x, atoms, bias = x.float(), atoms.float().clone(), bias.float().clone()
    for _ in tqdm(range(iterations), desc=desc, disable=not progress, leave=False):
        atoms, bias, fvu = mod_step(x, atoms, bias, k)
        history.append(fvu)
    return atoms, bias, history


def train_pursuit_dictionary(model, tokenizer, text_path, config: PursuitConfig, out_dir, progress: bool = True):
    """Collect a model's cached keys/values over a text and learn OMP dictionaries for every compressible layer
    by MOD; saves to ``out_dir`` and returns the :class:`KVDictionary`."""
    generator = torch.Generator().manual_seed(config.seed)
    layers = compressible_layers(model.config)
    num_layers, heads, head_dim = kv_geometry(model.config)
    windows = token_windows(tokenizer, text_path, config.context, config.windows)
    if windows.shape[0] == 0:
        raise ValueError(f"{text_path} holds fewer than {config.context} tokens")
    collected = {(i, kind): [] for i in layers for kind in KINDS}
    batches = iter_kv(model, windows, layers=layers, key_space=config.key_space, skip_first=config.skip_first)
    for batch in tqdm(batches, total=-(-windows.shape[0] // 4), desc="collect keys/values", disable=not progress):
        for i in layers:
            collected[i, "key"].append(batch.keys[i][0])
            collected[i, "value"].append(batch.values[i][0])
    rope_scaling = rotary_for_layer(model, layers[0])[1] if config.key_space == "pre_rope" else 1.0
    meta = KVDictionaryConfig(
        base_model=model.config._name_or_path,
        num_layers=num_layers,
        layer_indices=layers,
        num_kv_heads=heads,
        head_dim=head_dim,
        n_atoms=config.n_atoms,
        k_key=config.k_key,
        k_value=config.k_value,
        key_space=config.key_space,
        encoder="omp",
        rope_scaling=float(rope_scaling),
        training={
            "text": str(text_path),
            "tokens": int(windows.numel()),
            "method": "MOD on OMP codes",
            **asdict(config),
        },
    )
    dictionary = KVDictionary(meta)
    for (i, kind), parts in tqdm(collected.items(), desc="MOD per layer and kind", disable=not progress):
        x = torch.cat(parts)
        x = x[torch.randperm(x.shape[0], generator=generator)[: config.vectors]]
        seeds = x[torch.randperm(x.shape[0], generator=generator)[: config.n_atoms]] - x.mean(0)
        k = config.k_key if kind == "key" else config.k_value
        atoms, bias, _ = learn_pursuit_dictionary(
            x, torch.nn.functional.normalize(seeds, dim=-1), x.mean(0), k, config.iterations
        )
        sae = dictionary[i].saes(kind)[0]
        with torch.no_grad():
            sae.W_dec.copy_(atoms)
            sae.b_dec.copy_(bias)
        if kind == "key" and config.key_space == "pre_rope":
            dictionary[i].rope_inv_freq.copy_(rotary_for_layer(model, i)[0])
    dictionary.save_pretrained(out_dir)
    return dictionary
