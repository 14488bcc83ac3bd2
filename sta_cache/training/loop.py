"""Train the per-layer key and value Top-K SAEs of a model on the keys/values it caches over a text (``sta-cache
train --method sae``).

One pass over the text streams every compressed layer's keys and values (:mod:`sta_cache.collect`) into a bounded
shuffle reservoir per dictionary (:mod:`.reservoir`); all dictionaries (layers x {key, value} x heads) train
together as one batched step of the stacked SAEs (:mod:`.sae`) drawn from the reservoirs while the text streams in.
Practice follows Gao et al. (2024): ``b_dec`` starts at the geometric median of the data, ``W_enc`` at
``W_dec^T``, decoder rows stay unit norm (the gradient component along each row is removed before the Adam step,
rows re-normalized after it), the loss is the normalized MSE, and dead atoms are revived by the AuxK loss.
Checkpoints in the run folder hold the whole state (:mod:`.checkpoint`), so an interrupted run resumed gives the
same weights. Over several processes (``torchrun``) each streams an equal share of the text into its own
reservoirs and checkpoint, and the steps are data-parallel (:mod:`.sae`).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..collect import iter_kv
from ..configs import TrainConfig
from ..dictionary import KINDS
from ..dtypes import DTYPES
from ..geometry import kv_geometry
from . import checkpoint
from .heldout import evaluate_stack, summary
from .reduction import LOCAL, Reduction
from .result import MethodResult
from .run import TIMERS, TrainingRun
from .sae import PARAMETERS

__all__ = ["train_sae"]


def train_sae(
    model,
    windows: torch.Tensor,
    eval_windows: torch.Tensor,
    layers: list[int],
    config: TrainConfig,
    folder: checkpoint.RunFolder,
    *,
    reduce: Reduction = LOCAL,
    progress: bool = True,
) -> MethodResult:
    """Train the Top-K SAEs of ``layers`` on the model's keys/values over ``windows``, evaluated on
    ``eval_windows``. A checkpoint in ``folder`` is resumed; the result is the same as an uninterrupted run's.

    With ``reduce`` across processes, each process streams ``len(windows) // processes`` windows of its own (the
    remainder of an uneven split is left out: every process must take the same number of steps), draws
    ``batch_size // processes`` vectors per step and averages its gradients with the others': the steps and the
    batch of one process's run, each process doing its share. ``folder`` is then this process's own."""
    _, heads, d = kv_geometry(model.config)
    per_window = (config.context - config.skip_first) * (1 if config.per_head else heads)
    batch_size = config.batch_size
    if reduce.across_processes:
        world = distributed.world()
        each = len(windows) // world.size
        if each == 0 or config.batch_size % world.size:
            raise ValueError(
                f"{len(windows)} training windows and batches of {config.batch_size} vectors cannot be shared by "
                f"{world.size} processes: give more text (max_tokens), a batch_size divisible by {world.size}, "
                "or use fewer processes"
            )
        windows = windows[world.rank * each : (world.rank + 1) * each]
        config = dataclasses.replace(config, batch_size=config.batch_size // world.size)
    run = TrainingRun(config, layers, heads, d, len(windows), per_window, reduce)
    collect = dict(
        layers=layers,
        key_space=config.key_space,
        per_head=config.per_head,
        batch_windows=config.batch_windows,
        skip_first=config.skip_first,
    )
    resuming = folder.checkpoint.is_file()
    log_bytes = 0
    if resuming:
        payload = folder.load_checkpoint()
        run.load_state_dict(payload["run"])
        log_bytes = int(payload["log_bytes"])
    steps = reduce.gather(run.steps_done)
    if len(set(steps)) > 1:
        raise RuntimeError(
            f"the processes' checkpoints stopped at different steps {steps} (interrupted while saving): "
            "start over with restart (--restart)"
        )
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

    _check_same_weights(run, reduce)
    run.sae.round_to(DTYPES[config.dtype])
    per_encoder, evaluation, eval_seconds = _final_evaluation(run, heldout, eval_windows, config)
    log = checkpoint.TrainLog(folder.log)
    for encoder, by_layer in per_encoder.items():
        log.write({"event": "heldout", "tag": "final", "step": run.steps_done, "encoder": encoder, "layers": by_layer})
    log.close()
    weights = {
        (layer, kind, h): {
            name: getattr(run.sae, name)[run.index(p, kind_idx, h)].detach().clone() for name in PARAMETERS
        }
        for p, layer in enumerate(layers)
        for kind_idx, kind in enumerate(KINDS)
        for h in range(run.hd)
    }
    training = {
        "steps": run.total_steps,
        "batch_size": batch_size,
        "batch_size_per_process": config.batch_size,
        "epochs": config.epochs,
        "lr": config.lr,
        "aux_k": run.sae.aux_k,
        "dead_steps": config.dead_steps,
        "buffer_size": run.reservoir.size,
        "init": config.init,
        "b_dec_init": config.b_dec_init,
        "tokens_per_process": reduce.gather(len(windows) * config.context),
        **{f"{name}_seconds": round(run.seconds[name], 1) for name in TIMERS},
        "eval_seconds": round(eval_seconds, 1),
    }
    return MethodResult(weights, training, evaluation, {"per_layer": per_encoder})


def _check_same_weights(run: TrainingRun, reduce: Reduction) -> None:
    """Data-parallel processes must end with the same weights (they average every step); refuse to save if not."""
    sums = torch.stack([getattr(run.sae, name).detach().double().sum() for name in PARAMETERS])
    parts = reduce.gather(sums)
    if any(not torch.equal(part, parts[0]) for part in parts):
        raise RuntimeError(f"the processes' SAE weights diverged (parameter sums {[p.tolist() for p in parts]})")


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
