"""``sta-cache train``: learn a model's per-layer key and value dictionaries from the keys and values it caches over
a text, by either method (:mod:`.mod`, the default; :mod:`.loop`, Top-K SAEs), on one process or several.

Under ``torchrun --nproc-per-node N`` (or ``accelerate launch``) every process runs this same function. With
``shard="data"`` each process collects its share of the text, and the processes sum their MOD statistics (the
dictionary equals one process's up to float summation order) or average their Top-K SAE gradients; with
``shard="layers"`` each process reads all the text and trains its share of the layers in its own resumable run
folder (``out_dir/shards/rank<r>``), and the parts are gathered. Rank 0 checks the result on held-out text and
writes the dictionary.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .. import distributed
from ..collect import heldout_sequence, rotary_for_layer, token_windows
from ..configs import TrainConfig
from ..dictionary import KINDS, KVDictionary, KVDictionaryConfig
from ..dtypes import DTYPES
from ..geometry import compressible_layers, kv_geometry
from ..text import TextSource
from . import checkpoint
from .loop import train_sae
from .mod import train_mod
from .quality import heldout_quality
from .reduction import Reduction
from .result import MethodResult

__all__ = ["train_dictionary"]

METHOD_NAMES = {"mod": "MOD on OMP codes", "sae": "Top-K SAE by gradient descent"}


def train_dictionary(
    model,
    tokenizer,
    text: TextSource | str | os.PathLike,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    eval_text: TextSource | str | os.PathLike | None = None,
) -> KVDictionary:
    """Learn dictionaries for every compressed layer of ``model`` from ``text`` (a file path or a
    :class:`~sta_cache.text.TextSource`) and save them to ``out_dir``.

    The first ``config.max_tokens`` tokens (in windows of ``config.context``) train; the held-out check uses the
    next ``config.eval_tokens`` tokens, or ``eval_text`` when given. With ``resume`` a run picks up its
    checkpoint in ``out_dir`` (or returns the finished dictionary there) with the same result as an
    uninterrupted run; without it, a run starts over.
    """
    world = distributed.init_from_environment(model.device)
    source = TextSource.of(text)
    eval_source = None if eval_text is None else TextSource.of(eval_text)
    out_dir = Path(out_dir)
    geometry = kv_geometry(model.config)
    layers = compressible_layers(model.config)
    by_layers = config.shard == "layers" and world.size > 1
    sae_by_data = config.method == "sae" and world.size > 1 and not by_layers  # per-process reservoirs and steps
    own_folders = by_layers or sae_by_data  # each process runs, checkpoints and resumes in a folder of its own
    if by_layers and world.size > len(layers):
        raise ValueError(
            f"shard='layers' over {world.size} processes needs as many layers, the model has {len(layers)}"
        )
    own_layers = layers[world.rank :: world.size] if by_layers else layers
    run_dir = out_dir / "shards" / f"rank{world.rank}" if own_folders else out_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = checkpoint.RunFolder(run_dir, checkpoint.fingerprint(config, geometry, own_layers, source, eval_source))
    show = progress and world.main
    if resume and folder.finished() and not own_folders:
        return KVDictionary.load_folder(out_dir)
    if not resume:
        folder.checkpoint.unlink(missing_ok=True)

    windows, eval_windows = _text_windows(tokenizer, source, eval_source, config)
    if resume and folder.finished():
        part = KVDictionary.load_folder(run_dir)
        result = MethodResult(_weights_of(part), part.config.training, part.config.evaluation)
    elif config.method == "mod":
        reduce = Reduction(across_processes=world.size > 1 and not by_layers)
        result = train_mod(
            model, windows, own_layers, config, folder, reduce=reduce, writer=world.main or by_layers, progress=show
        )
    else:
        reduce = Reduction(across_processes=sae_by_data)
        result = train_sae(model, windows, eval_windows, own_layers, config, folder, reduce=reduce, progress=show)
    if by_layers:
        part = _assemble(model, config, own_layers, source, windows, eval_source, result, world)
        part.save_pretrained(run_dir)
        folder.finish({"summary": part.config.evaluation, **result.report})
        result = _gather_layers(result, layers)

    if world.main:
        dictionary = _assemble(model, config, layers, source, windows, eval_source, result, world)
        sequence = heldout_sequence(
            tokenizer, eval_source or source, config.eval_tokens, 0 if eval_source else len(windows), config.context
        )
        quality = heldout_quality(model, dictionary, eval_windows, sequence, config, progress=show)
        dictionary.config.evaluation = {**result.evaluation, **quality}
        dictionary.save_pretrained(out_dir, dtype=None if config.dtype == "float32" else DTYPES[config.dtype])
        if not own_folders:
            folder.finish({"summary": dictionary.config.evaluation, **result.report})
    distributed.barrier()
    return KVDictionary.load_folder(out_dir)


def _text_windows(
    tokenizer, source: TextSource, eval_source: TextSource | None, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training windows, then the held-out windows (after them in the same text, or from ``eval_source``)."""
    n_windows = max(1, math.ceil(config.max_tokens / config.context))
    windows = token_windows(tokenizer, source, config.context, n_windows)
    n_eval = max(1, math.ceil(config.eval_tokens / config.context))
    if eval_source is not None:
        eval_windows = token_windows(tokenizer, eval_source, config.context, n_eval)
    else:
        eval_windows = token_windows(tokenizer, source, config.context, n_eval, skip_windows=len(windows))
    if len(windows) == 0 or len(eval_windows) == 0:
        raise ValueError(
            f"{source.name()} is too short for {n_windows} training windows of {config.context} tokens plus "
            "held-out text; lower max_tokens/eval_tokens/context or give a held-out text"
        )
    return windows, eval_windows


def _gather_layers(result: MethodResult, layers: list[int]) -> MethodResult:
    """Every process's dictionaries and records, merged (each process trained some of ``layers``)."""
    parts = distributed.all_gather_objects(result)
    weights = {key: value for part in parts for key, value in part.weights.items()}
    missing = sorted(set(layers) - {layer for layer, _, _ in weights})
    if missing:
        raise RuntimeError(f"no process trained layers {missing}")
    training = {"per_process": [part.training for part in parts]}
    evaluation = {}
    report = {"per_process": [part.report for part in parts]}
    return MethodResult(weights, training, evaluation, report)


def _weights_of(dictionary: KVDictionary) -> dict:
    """The weights of a saved (partial) dictionary, keyed as a method returns them."""
    return {
        (layer, kind, h): {name: tensor.detach().clone() for name, tensor in sae.named_parameters()}
        for layer in dictionary.config.layer_indices
        for kind in KINDS
        for h, sae in enumerate(dictionary[layer].saes(kind))
    }


def _assemble(
    model,
    config: TrainConfig,
    layers: list[int],
    source: TextSource,
    windows: torch.Tensor,
    eval_source: TextSource | None,
    result: MethodResult,
    world: distributed.Ranks,
) -> KVDictionary:
    """A :class:`KVDictionary` of ``layers`` holding the method's weights and, for pre-RoPE keys, each layer's
    rotary frequencies; its config records the model geometry, the budget and how it was trained."""
    num_layers, heads, d = kv_geometry(model.config)
    rotary = {i: rotary_for_layer(model, i) for i in layers} if config.key_space == "pre_rope" else {}
    scalings = {round(scaling, 6) for _, scaling in rotary.values()}
    if len(scalings) > 1:
        raise ValueError(f"the compressed layers use different rotary attention scalings {sorted(scalings)}")
    base_model = config.base_model or getattr(model, "name_or_path", None) or model.config._name_or_path or "unknown"
    held_out = eval_source.name() if eval_source else f"{source.name()} (after the training tokens)"
    meta = KVDictionaryConfig(
        base_model=str(base_model),
        num_layers=num_layers,
        layer_indices=layers,
        num_kv_heads=heads,
        head_dim=d,
        n_atoms=config.n_atoms,
        per_head=config.per_head,
        k_key=config.k_key,
        k_value=config.k_value,
        key_space=config.key_space,
        encoder=config.encoder,
        rope_scaling=scalings.pop() if scalings else 1.0,
        training={
            "method": METHOD_NAMES[config.method],
            "text": source.name(),
            **{f"text_{name}": value for name, value in source.fingerprint().items() if name != "path"},
            "tokens": int(windows.numel()),
            "context": config.context,
            "windows": len(windows),
            "skip_first": config.skip_first,
            "seed": config.seed,
            "eval_text": held_out,
            "world_size": world.size,
            "shard": config.shard if world.size > 1 else None,
            **({"iterations": config.iterations} if config.method == "mod" else {}),
            **result.training,
        },
        evaluation=dict(result.evaluation),
    )
    dictionary = KVDictionary(meta)
    with torch.no_grad():
        for layer in layers:
            for kind in KINDS:
                for h, sae in enumerate(dictionary[layer].saes(kind)):
                    weights = result.weights[layer, kind, h]
                    for name, tensor in sae.named_parameters():
                        tensor.copy_(weights[name])
            if layer in rotary:
                dictionary[layer].rope_inv_freq.copy_(rotary[layer][0])
    return dictionary
