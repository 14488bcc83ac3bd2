"""Train the per-layer key and value Top-K SAEs of a model on the keys/values it caches over a text.

One pass over the text streams every compressed layer's keys and values (:mod:`sta_cache.collect`) into a bounded
shuffle reservoir per dictionary (:mod:`.reservoir`); all dictionaries (layers x {key, value} x heads) train
together as one batched step of the stacked SAEs (:mod:`.sae`) drawn from the reservoirs while the text streams in.
Practice follows Gao et al. (2024): ``b_dec`` starts at the geometric median of the data, ``W_enc`` at
``W_dec^T``, decoder rows stay unit norm (the gradient component along each row is removed before the Adam step,
rows re-normalized after it), the loss is the normalized MSE, and dead atoms are revived by the AuxK loss.
Checkpoints in ``out_dir`` hold the whole state (:mod:`.checkpoint`), so an interrupted run resumed gives the same
weights.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..collect import iter_kv, rotary_for_layer, text_path_of, token_windows
from ..configs import TrainConfig
from ..dictionary import KINDS, KVDictionary, KVDictionaryConfig
from ..dtypes import DTYPES
from ..geometry import compressible_layers, kv_geometry
from . import checkpoint
from .heldout import evaluate_stack, summary
from .run import TrainingRun

__all__ = ["train_dictionary"]


def train_dictionary(
    model,
    tokenizer,
    text_path: str | os.PathLike,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = True,
    progress: bool = True,
    eval_text_path: str | os.PathLike | None = None,
) -> KVDictionary:
    """Train key and value dictionaries for every compressed layer of ``model`` on ``text_path`` and save them
    to ``out_dir`` (``KVDictionary.save_pretrained`` + ``train_log.jsonl`` + ``evaluation.json``).

    The first ``config.max_tokens`` tokens of the text (in windows of ``config.context``) train; the held-out
    vectors come from the next ``config.eval_tokens`` tokens, or from ``eval_text_path`` when given. With
    ``resume`` a run picks up its checkpoint in ``out_dir`` (or returns the finished dictionary there); the
    result is the same as an uninterrupted run's.
    """
    text_path = text_path_of(text_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    geometry = kv_geometry(model.config)
    layers = compressible_layers(model.config)
    eval_text = None if eval_text_path is None else text_path_of(eval_text_path)
    folder = checkpoint.RunFolder(out_dir, checkpoint.fingerprint(config, geometry, layers, text_path, eval_text))
    if resume and folder.finished():
        return KVDictionary.load_folder(out_dir)

    windows, eval_windows = _text_windows(tokenizer, text_path, config, eval_text_path)
    _, heads, d = geometry
    per_window = (config.context - config.skip_first) * (1 if config.per_head else heads)
    run = TrainingRun(config, layers, heads, d, len(windows), per_window)
    collect = dict(
        layers=layers,
        key_space=config.key_space,
        per_head=config.per_head,
        batch_windows=config.batch_windows,
        skip_first=config.skip_first,
    )

    resuming = resume and folder.checkpoint.is_file()
    log_bytes = 0
    if resuming:
        payload = folder.load_checkpoint()
        run.load_state_dict(payload["run"])
        log_bytes = int(payload["log_bytes"])
    folder.start(resuming, log_bytes)
    log = checkpoint.TrainLog(folder.log)
    try:
        heldout = _heldout_vectors(model, run, eval_windows, collect, config)
        trainer = _Trainer(run, folder, log, heldout, len(windows), progress)
        try:
            if run.windows_done < len(windows):
                trainer.stream(iter_kv(model, windows[run.windows_done :], **collect))
            trainer.train_until(final=True)
        finally:
            trainer.close()
    finally:
        log.close()

    run.sae.round_to(DTYPES[config.dtype])
    per_encoder, evaluation, eval_seconds = _final_evaluation(run, heldout, eval_windows, config)
    log = checkpoint.TrainLog(folder.log)
    for encoder, by_layer in per_encoder.items():
        log.write({"event": "heldout", "tag": "final", "step": run.steps_done, "encoder": encoder, "layers": by_layer})
    log.close()

    rotary, rope_scaling = _rotary(model, config, layers)
    meta = _dictionary_config(
        model,
        config,
        run,
        text_path,
        folder.fingerprint["text"]["sha256"],
        windows,
        eval_text_path,
        rope_scaling,
        evaluation,
        eval_seconds,
    )
    dictionary = _export(run, meta, rotary)
    dictionary.save_pretrained(out_dir, dtype=None if config.dtype == "float32" else DTYPES[config.dtype])
    folder.finish({"summary": evaluation, "per_layer": per_encoder, "k_key": config.k_key, "k_value": config.k_value})
    return KVDictionary.load_folder(out_dir)


def _text_windows(tokenizer, text_path: Path, config: TrainConfig, eval_text_path) -> tuple[torch.Tensor, torch.Tensor]:
    """The training windows, then the held-out windows (after them in the same text, or from ``eval_text_path``)."""
    n_windows = max(1, math.ceil(config.max_tokens / config.context))
    windows = token_windows(tokenizer, text_path, config.context, n_windows)
    n_eval = max(1, math.ceil(config.eval_tokens / config.context))
    if eval_text_path is not None:
        eval_windows = token_windows(tokenizer, eval_text_path, config.context, n_eval)
    else:
        eval_windows = token_windows(tokenizer, text_path, config.context, n_eval, skip_windows=len(windows))
    if len(windows) == 0 or len(eval_windows) == 0:
        raise ValueError(
            f"{text_path} is too short for {n_windows} training windows of {config.context} tokens plus held-out "
            "text; lower max_tokens/eval_tokens/context or pass eval_text_path"
        )
    return windows, eval_windows


def _heldout_vectors(model, run: TrainingRun, eval_windows: torch.Tensor, collect: dict, config: TrainConfig):
    """``[S, <= eval_vectors, d]`` held-out vectors in stack order (recomputed on resume: deterministic and small)."""
    eval_rng = torch.Generator().manual_seed(config.seed + 1)
    heldout = torch.cat(
        [run.stack(batch.keys, batch.values) for batch in iter_kv(model, eval_windows, **collect)], dim=1
    )
    if heldout.shape[1] > config.eval_vectors:
        heldout = heldout[:, torch.randperm(heldout.shape[1], generator=eval_rng)[: config.eval_vectors]]
    return heldout


class _Trainer:
    """Drives a :class:`TrainingRun`: takes the streamed vectors, trains the steps they make due, logs, evaluates
    and checkpoints on schedule, and shows progress."""

    def __init__(
        self,
        run: TrainingRun,
        folder: checkpoint.RunFolder,
        log: checkpoint.TrainLog,
        heldout: torch.Tensor,
        windows: int,
        progress: bool,
    ):
        self.run, self.folder, self.log, self.heldout = run, folder, log, heldout
        self.config = run.config
        context = self.config.context
        self.collect_bar = tqdm(
            total=windows * context,
            initial=run.windows_done * context,
            desc="collect (tokens)",
            unit="tok",
            disable=not progress,
            dynamic_ncols=True,
        )
        self.train_bar = tqdm(
            total=run.total_steps,
            initial=run.steps_done,
            desc="train (steps)",
            unit="step",
            disable=not progress,
            dynamic_ncols=True,
        )
        self.last_checkpoint = run.steps_done

    def close(self) -> None:
        self.collect_bar.close()
        self.train_bar.close()

    def checkpoint(self) -> None:
        self.folder.save_checkpoint(self.run.state_dict(), self.log.tell())
        self.last_checkpoint = self.run.steps_done

    def checkpoint_due(self) -> bool:
        return self.run.steps_done - self.last_checkpoint >= self.config.checkpoint_every

    def log_heldout(self, tag: str) -> None:
        fvu, cos = evaluate_stack(self.run.sae, self.heldout, "topk")
        self.log.write(
            {
                "event": "heldout",
                "tag": tag,
                "step": self.run.steps_done,
                "encoder": "topk",
                "layers": self.run.by_layer({"fvu": fvu, "cos": cos}),
            }
        )

    def stream(self, batches) -> None:
        """Take the rest of the text's key/value batches, training as they come."""
        run = self.run
        while True:
            start, cpu = time.perf_counter(), time.process_time()
            batch = next(batches, None)
            run.seconds["collect"] += time.perf_counter() - start
            run.seconds["collect_cpu"] += time.process_time() - cpu
            if batch is None:
                break
            run.reservoir.insert(run.stack(batch.keys, batch.values))
            run.windows_done += batch.tokens // self.config.context
            self.collect_bar.update(batch.tokens)
            self.train_until(final=False)
            if self.checkpoint_due():
                self.checkpoint()

    def train_until(self, final: bool) -> None:
        """Train the steps due so far (all of them when ``final``), initializing first once the reservoir allows."""
        run, config = self.run, self.config
        if not run.initialized:
            if not run.ready(final):
                return
            run.initialize()
            self.log_heldout("init")
        while run.steps_done < run.owed_steps(final):
            start, cpu = time.perf_counter(), time.process_time()
            stats = run.train_step()
            run.seconds["train"] += time.perf_counter() - start
            run.seconds["train_cpu"] += time.process_time() - cpu
            self.train_bar.update(1)
            if run.steps_done % config.log_every == 0 or run.steps_done == run.total_steps:
                self.log.write(
                    {
                        "event": "train",
                        "step": run.steps_done,
                        "lr": run.lr(run.steps_done - 1),
                        "tokens": run.windows_done * config.context,
                        "layers": run.by_layer({k: v.tolist() for k, v in stats.items()}),
                    }
                )
                self.train_bar.set_postfix(
                    fvu=f"{stats['fvu'].mean():.3f}",
                    cos=f"{stats['cos'].mean():.3f}",
                    dead=f"{stats['dead'].mean():.3f}",
                )
            if config.eval_every and run.steps_done % config.eval_every == 0:
                self.log_heldout(f"step{run.steps_done}")
            if final and self.checkpoint_due():
                self.checkpoint()


def _final_evaluation(run: TrainingRun, heldout: torch.Tensor, eval_windows: torch.Tensor, config: TrainConfig):
    """Held-out FVU and cosine with both encoders: ``(per encoder {layer: {kind: stats}}, summary, seconds)``."""
    per_encoder = {}
    evaluation: dict = {
        "heldout_tokens": int(eval_windows.numel()),
        "heldout_vectors_topk": int(heldout.shape[1]),
        "heldout_vectors_omp": int(min(heldout.shape[1], config.eval_vectors_omp)),
    }
    start = time.perf_counter()
    for encoder in ("topk", "omp"):
        subset = heldout if encoder == "topk" else heldout[:, : config.eval_vectors_omp]
        fvu, cos = evaluate_stack(run.sae, subset, encoder)
        per_encoder[encoder] = run.by_layer({"fvu": fvu, "cos": cos})
        evaluation.update(summary(per_encoder[encoder], encoder))
    return per_encoder, evaluation, time.perf_counter() - start


def _rotary(model, config: TrainConfig, layers: list[int]) -> tuple[dict[int, tuple[torch.Tensor, float]], float]:
    """The rotary frequencies of each layer a pre-RoPE dictionary re-rotates with, and their one attention scaling."""
    rotary = {i: rotary_for_layer(model, i) for i in layers} if config.key_space == "pre_rope" else {}
    scalings = {round(s, 6) for _, s in rotary.values()}
    if len(scalings) > 1:
        raise ValueError(f"the compressed layers use different rotary attention scalings {sorted(scalings)}")
    return rotary, scalings.pop() if scalings else 1.0


def _dictionary_config(
    model,
    config: TrainConfig,
    run: TrainingRun,
    text: Path,
    text_sha256: str,
    windows,
    eval_text_path,
    rope_scaling: float,
    evaluation: dict,
    eval_seconds: float,
) -> KVDictionaryConfig:
    """The saved dictionary's config: the model geometry, the budget, and how it was trained and how well it does."""
    num_layers, heads, d = kv_geometry(model.config)
    base_model = config.base_model or getattr(model, "name_or_path", None) or model.config._name_or_path or "unknown"
    return KVDictionaryConfig(
        base_model=str(base_model),
        num_layers=num_layers,
        layer_indices=run.layers,
        num_kv_heads=heads,
        head_dim=d,
        n_atoms=config.n_atoms,
        per_head=config.per_head,
        k_key=config.k_key,
        k_value=config.k_value,
        key_space=config.key_space,
        encoder=config.encoder,
        rope_scaling=rope_scaling,
        training={
            "text": text.name,
            "text_sha256": text_sha256,
            "tokens": int(windows.numel()),
            "context": config.context,
            "windows": len(windows),
            "skip_first": config.skip_first,
            "seed": config.seed,
            "steps": run.total_steps,
            "batch_size": config.batch_size,
            "epochs": config.epochs,
            "lr": config.lr,
            "aux_k": run.sae.aux_k,
            "dead_steps": config.dead_steps,
            "buffer_size": run.reservoir.size,
            "init": config.init,
            "b_dec_init": config.b_dec_init,
            "eval_text": _eval_text_name(text, eval_text_path),
            "collect_seconds": round(run.seconds["collect"], 1),
            "collect_cpu_seconds": round(run.seconds["collect_cpu"], 1),
            "train_seconds": round(run.seconds["train"], 1),
            "train_cpu_seconds": round(run.seconds["train_cpu"], 1),
            "eval_seconds": round(eval_seconds, 1),
        },
        evaluation=evaluation,
    )


def _eval_text_name(text: Path, eval_text_path) -> str:
    return Path(eval_text_path).name if eval_text_path is not None else f"{text.name} (after the training tokens)"


def _export(run: TrainingRun, meta: KVDictionaryConfig, rotary: dict[int, tuple[torch.Tensor, float]]) -> KVDictionary:
    """A :class:`KVDictionary` holding the run's weights and, for pre-RoPE keys, each layer's frequencies."""
    dictionary = KVDictionary(meta)
    with torch.no_grad():
        for p, layer in enumerate(run.layers):
            for kind_idx, kind in enumerate(KINDS):
                for h, sae in enumerate(dictionary[layer].saes(kind)):
                    run.sae.export(run.index(p, kind_idx, h), sae)
            if layer in rotary:
                dictionary[layer].rope_inv_freq.copy_(rotary[layer][0])
    return dictionary
