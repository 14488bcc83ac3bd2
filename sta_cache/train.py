"""Train the per-layer key and value Top-K SAEs of a model on the keys/values it caches over a text.

One pass over the text streams every compressed layer's keys and values (:mod:`sta_cache.collect`) into a bounded
shuffle reservoir per dictionary; all dictionaries (layers x {key, value} x heads) train together as one batched
"multi-SAE" step drawn from the reservoirs while the text streams in. Practice follows Gao et al. (2024):
``b_dec`` starts at the geometric median of the data, ``W_enc`` at ``W_dec^T``, decoder rows stay unit norm (the
gradient component along each row is removed before the Adam step, rows re-normalized after it), the loss is the
normalized MSE, and dead atoms are revived by the AuxK loss. Checkpoints in ``out_dir`` hold the whole state
(weights, Adam, reservoirs, RNG, stream position), so an interrupted run resumed gives the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .collect import iter_kv, rotary_for_layer, text_path_of, token_windows
from .geometry import compressible_layers, kv_geometry
from .configs import TrainConfig
from .dictionary import KINDS, KVDictionary, KVDictionaryConfig
from .kernels.reference import omp_encode_reference

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
STATE_NAME = "train_state.json"
EVALUATION_NAME = "evaluation.json"
INIT_VECTORS = 8192  # per dictionary, for b_dec, the loss normalizer, data-initialised atoms and the W_enc scale
_TIMERS = ("collect", "collect_cpu", "train", "train_cpu")  # wall-clock and process CPU seconds
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = ["TrainConfig", "train_dictionary", "evaluate_dictionary"]


# --------------------------------------------------------------------------------------------- the multi-SAE
class _MultiSAE:
    """``S`` independent Top-K SAEs trained as one: parameters stacked on a leading axis."""

    def __init__(self, S: int, d: int, n_atoms: int, ks: list[int], config: TrainConfig):
        self.S, self.d, self.N = S, d, n_atoms
        self.config = config
        self.W_enc = torch.zeros(S, d, n_atoms, requires_grad=True)
        self.b_enc = torch.zeros(S, n_atoms, requires_grad=True)
        self.W_dec = torch.zeros(S, n_atoms, d, requires_grad=True)
        self.b_dec = torch.zeros(S, d, requires_grad=True)
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.ks = torch.tensor(ks)
        self.kmax = int(self.ks.max())
        self.kmask = (torch.arange(self.kmax)[None] < self.ks[:, None]).float()  # [S, kmax]
        self.aux_k = min(config.aux_k or max(1, d // 2), n_atoms)
        self.offsets = (torch.arange(S) * n_atoms).view(S, 1, 1)
        self.var = torch.ones(S)  # loss normalizer: per-dictionary data variance
        self.last_fired = torch.zeros(S, n_atoms, dtype=torch.long)
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)

    # ----------------------------------------------------------------------------- init
    @torch.no_grad()
    def initialize(self, data: torch.Tensor, generator: torch.Generator) -> None:
        """``data [S, M, d]``: the first reservoir fill."""
        S, M, d = data.shape
        mean = data.mean(1)
        if self.config.b_dec_init == "geometric_median":
            b_dec = _geometric_median(data, mean)
        elif self.config.b_dec_init == "mean":
            b_dec = mean
        else:
            b_dec = torch.zeros_like(mean)
        self.b_dec.copy_(b_dec)
        self.var.copy_((data - mean[:, None]).pow(2).sum(-1).mean(-1).clamp_min(1e-12))
        if self.config.init == "data":  # atoms start at random centred data points
            pick = torch.stack([torch.randperm(M, generator=generator)[: self.N] for _ in range(S)]) if M >= self.N \
                else torch.randint(M, (S, self.N), generator=generator)
            atoms = torch.gather(data, 1, pick[..., None].expand(-1, -1, d)) - b_dec[:, None]
            atoms += 1e-3 * atoms.norm(dim=-1, keepdim=True).mean() * torch.randn(atoms.shape, generator=generator)
        else:
            atoms = torch.randn(S, self.N, d, generator=generator)
        self.W_dec.copy_(atoms / atoms.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        self.W_enc.copy_(self.W_dec.transpose(1, 2))
        self.b_enc.zero_()
        # Scale W_enc so the initial codes reconstruct the data at the right size: with b_enc = 0 the Top-K choice
        # is scale invariant, so the least-squares scale of the decoded codes is exact. Without it, correlated
        # (data-initialised) atoms sum k overlapping projections and the first steps fight a k-fold overshoot.
        sample = data[:, : min(M, 4096)]
        centred = sample - b_dec[:, None]
        values, idx = torch.bmm(centred, self.W_enc).topk(self.kmax, dim=-1)
        coef = values.relu() * self.kmask[:, None]
        decoded = F.embedding_bag((idx + self.offsets).reshape(-1, self.kmax), self.W_dec.reshape(-1, self.d),
                                  per_sample_weights=coef.reshape(-1, self.kmax), mode="sum").view_as(sample)
        scale = (centred * decoded).sum((1, 2)) / decoded.pow(2).sum((1, 2)).clamp_min(1e-12)
        self.W_enc.mul_(scale.clamp_min(1e-6)[:, None, None])

    # ----------------------------------------------------------------------------- forward pieces
    def _decode(self, idx: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """Sum of ``coef``-weighted atoms ``idx [S, B, k]`` (no bias) -> ``[S, B, d]``; sparse in both passes."""
        S, B, k = idx.shape
        flat = (idx + self.offsets).reshape(S * B, k)
        out = F.embedding_bag(flat, self.W_dec.reshape(S * self.N, self.d), per_sample_weights=coef.reshape(S * B, k),
                              mode="sum")
        return out.view(S, B, self.d)

    def step(self, x: torch.Tensor, step: int, lr: float) -> dict[str, torch.Tensor]:
        """One Adam step on ``x [S, B, d]``; returns per-dictionary batch statistics."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        S, B, d = x.shape
        kmax, aux_k = self.kmax, self.aux_k
        xc = x - self.b_dec[:, None]
        with torch.no_grad():
            pre = torch.baddbmm(self.b_enc[:, None], xc, self.W_enc)  # [S, B, N]
            idx = pre.topk(kmax, dim=-1).indices
            dead = (step - self.last_fired) > self.config.dead_steps  # [S, N]
            with_dead = dead.any(-1).nonzero().flatten() if self.config.aux_coef > 0 else dead.new_zeros(0)
            if len(with_dead):
                # AuxK: the dead atoms with the largest pre-activations model the residual (Gao et al. 2024, A.2).
                # Only the dead columns are searched: [S', B, D] with D the largest dead count.
                sub_dead = dead[with_dead]
                counts = sub_dead.sum(-1)
                width = int(counts.max())
                columns = torch.argsort((~sub_dead).to(torch.uint8), dim=-1, stable=True)[:, :width]  # dead first
                valid = torch.arange(width)[None] < counts[:, None]  # [S', D]
                candidates = pre[with_dead].gather(-1, columns[:, None].expand(-1, B, -1))
                candidates.masked_fill_(~valid[:, None], -math.inf)
                aux_top, aux_pos = candidates.topk(min(aux_k, width), dim=-1)
                aux_ok = torch.isfinite(aux_top)
                aux_sub = columns[:, None].expand(-1, B, -1).gather(-1, aux_pos)
                aux_idx = idx.new_zeros(S, B, aux_sub.shape[-1])
                aux_idx[with_dead] = aux_sub
                idx = torch.cat([idx, aux_idx], dim=-1)
        values = _GatherPreactivations.apply(xc, self.W_enc, self.b_enc, pre, idx)  # [S, B, kmax (+ aux_k)]
        del pre
        coef = values[..., :kmax].relu() * self.kmask[:, None]
        flat = (idx[..., :kmax] + self.offsets).reshape(-1)
        weights = coef.reshape(-1)
        offsets = torch.arange(S * B) * kmax
        if len(with_dead):  # one embedding_bag for both: S*B bags of kmax atoms, then |SAEs with dead|*B bags
            aux_coef = values[with_dead, :, kmax:].relu() * aux_ok
            flat = torch.cat([flat, (aux_sub + self.offsets[with_dead]).reshape(-1)])
            weights = torch.cat([weights, aux_coef.reshape(-1)])
            offsets = torch.cat([offsets, S * B * kmax + torch.arange(len(with_dead) * B) * aux_sub.shape[-1]])
        decoded = F.embedding_bag(flat, self.W_dec.reshape(S * self.N, d), offsets, mode="sum",
                                  per_sample_weights=weights)
        recon = decoded[: S * B].view(S, B, d) + self.b_dec[:, None]
        err = x - recon
        mse = err.pow(2).sum(-1).mean(-1)  # [S]
        loss = (mse / self.var).sum()
        if len(with_dead):
            aux_recon = decoded[S * B :].view(len(with_dead), B, d)
            aux_mse = (err.detach()[with_dead] - aux_recon).pow(2).sum(-1).mean(-1)
            loss = loss + self.config.aux_coef * (aux_mse / self.var[with_dead]).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            grad, W = self.W_dec.grad, self.W_dec
            grad.sub_((grad * W).sum(-1, keepdim=True) * W)  # keep the step tangent to the unit sphere
        self.optimizer.step()
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            main = idx[..., :kmax].reshape(S, -1)
            fired = torch.zeros(S, self.N).scatter_add_(-1, main, (coef > 0).float().reshape(S, -1)) > 0
            self.last_fired.masked_fill_(fired, step)
            centred = (x - x.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1)
            return {
                "fvu": (mse.detach() / centred.clamp_min(1e-12)),
                "cos": F.cosine_similarity(recon.detach(), x, dim=-1).mean(-1),
                "dead": dead.float().mean(-1),
            }

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "W_enc": self.W_enc.detach(), "b_enc": self.b_enc.detach(), "W_dec": self.W_dec.detach(),
            "b_dec": self.b_dec.detach(), "var": self.var, "last_fired": self.last_fired,
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(self, name).copy_(state[name])
            self.var.copy_(state["var"])
            self.last_fired.copy_(state["last_fired"])
        self.optimizer.load_state_dict(state["optimizer"])


class _GatherPreactivations(torch.autograd.Function):
    """``pre[s, b, idx[s, b, j]]`` of ``pre = (xc @ W_enc) + b_enc``, given ``pre`` computed without autograd.

    The backward is sparse where it can be: ``grad_xc`` gathers the chosen encoder columns (an embedding_bag)
    instead of a dense ``[S, B, N] x [S, N, d]`` product; ``grad_W_enc`` is one batched product with the
    scattered gradients."""

    @staticmethod
    def forward(ctx, xc, W_enc, b_enc, pre, idx):
        ctx.save_for_backward(xc, W_enc, idx)
        return pre.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad):
        xc, W_enc, idx = ctx.saved_tensors
        S, B, K = idx.shape
        N, d = W_enc.shape[2], W_enc.shape[1]
        dense = torch.zeros(S, B, N, dtype=grad.dtype).scatter_add_(-1, idx, grad)
        grad_W_enc = torch.bmm(xc.transpose(1, 2), dense)
        grad_b_enc = dense.sum(1)
        del dense
        columns = W_enc.transpose(1, 2).reshape(S * N, d)
        flat = (idx + (torch.arange(S) * N).view(S, 1, 1)).reshape(S * B, K)
        grad_xc = F.embedding_bag(flat, columns, per_sample_weights=grad.reshape(S * B, K), mode="sum")
        return grad_xc.view(S, B, d), grad_W_enc, grad_b_enc, None, None


@torch.no_grad()
def _geometric_median(x: torch.Tensor, start: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm on ``x [S, M, d]`` for every ``S`` at once."""
    median = start.clone()
    for _ in range(iterations):
        weights = 1.0 / (x - median[:, None]).norm(dim=-1).clamp_min(1e-8)  # [S, M]
        median = (weights[..., None] * x).sum(1) / weights.sum(1, keepdim=True)
    return median


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _reconstruct(W_enc, b_enc, W_dec, b_dec, x: torch.Tensor, k: int, encoder: str) -> torch.Tensor:
    if encoder == "omp":
        idx, coef = omp_encode_reference(x, W_dec, b_dec, k)
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
    fvu = (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return fvu.item(), F.cosine_similarity(recon, x, dim=-1).mean().item()


@torch.no_grad()
def _evaluate_stack(sae: _MultiSAE, x: torch.Tensor, encoder: str, chunk: int = 1024) -> tuple[list, list]:
    """Held-out FVU and cosine of every stacked dictionary on ``x [S, E, d]``."""
    fvu, cos = [], []
    for s in range(sae.S):
        k = int(sae.ks[s])
        recon = torch.cat([
            _reconstruct(sae.W_enc[s], sae.b_enc[s], sae.W_dec[s], sae.b_dec[s], part, k, encoder)
            for part in x[s].split(chunk)
        ])
        f, c = _stats(x[s], recon)
        fvu.append(f)
        cos.append(c)
    return fvu, cos


@torch.no_grad()
def evaluate_dictionary(
    dictionary: KVDictionary,
    vectors: dict[int, tuple[torch.Tensor, torch.Tensor]],
    *,
    encoder: str | None = None,
    k_key: int | None = None,
    k_value: int | None = None,
) -> dict[int, dict[str, dict[str, float]]]:
    """FVU and cosine of ``dictionary`` on held-out vectors ``{layer: (keys, values)}`` as :func:`iter_kv`
    yields them (``[Hd, n, d]``) -> ``{layer: {"key": {"fvu", "cos"}, "value": {...}}}`` (means over heads)."""
    meta = dictionary.config
    encoder = encoder or meta.encoder
    ks = {"key": k_key or meta.k_key, "value": k_value or meta.k_value}
    out: dict[int, dict[str, dict[str, float]]] = {}
    for layer, pair in vectors.items():
        out[layer] = {}
        for kind, x in zip(KINDS, pair):
            stats = []
            for h, sae in enumerate(dictionary[layer].saes(kind)):
                recon = _reconstruct(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, x[h].float(), ks[kind], encoder)
                stats.append(_stats(x[h].float(), recon))
            out[layer][kind] = {"fvu": sum(s[0] for s in stats) / len(stats),
                                "cos": sum(s[1] for s in stats) / len(stats)}
    return out


# --------------------------------------------------------------------------------------------- the run
class _Run:
    """The state of one training run: multi-SAE, reservoirs, RNG and stream position."""

    def __init__(self, config: TrainConfig, layers: list[int], heads: int, d: int, windows: int, per_window: int):
        self.config = config
        self.layers = layers
        self.hd = heads if config.per_head else 1
        self.S = len(layers) * len(KINDS) * self.hd
        k_of = {"key": config.k_key, "value": config.k_value}
        ks = [k_of[kind] for _ in layers for kind in KINDS for _ in range(self.hd)]
        self.sae = _MultiSAE(self.S, d, config.n_atoms, ks, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        # reservoirs in bfloat16 (float32 range; its 0.4% rounding is far below any reconstruction error here)
        per_dictionary = int(config.buffer_mb * 2**20) // (self.S * d * 2)
        self.buffer_size = max(config.batch_size, min(config.buffer_size, per_dictionary))
        self.buffer = torch.zeros(self.S, self.buffer_size, d, dtype=torch.bfloat16)
        self.fill = 0
        self.windows_done = 0
        self.vectors_in = 0
        self.steps_done = 0
        self.initialized = False
        self.total_vectors = windows * per_window
        if config.steps is not None:
            self.total_steps = int(config.steps)
        else:
            self.total_steps = max(1, math.ceil(config.epochs * self.total_vectors / config.batch_size))
        self.seconds = dict.fromkeys(_TIMERS, 0.0)
        self.last_stats: dict[str, torch.Tensor] | None = None

    def index(self, layer_pos: int, kind: int, head: int) -> int:
        return (layer_pos * len(KINDS) + kind) * self.hd + head

    def stack(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per-layer ``[Hd, n, d]`` keys/values -> ``[S, n, d]`` in dictionary order."""
        return torch.cat([t for i in self.layers for t in (keys[i], values[i])], dim=0)

    def insert(self, x: torch.Tensor) -> None:
        """Add ``x [S, n, d]`` to the reservoirs: append until full, then overwrite random slots."""
        x = x.to(self.buffer.dtype)
        n = x.shape[1]
        M = self.buffer.shape[1]
        self.vectors_in += n
        room = M - self.fill
        if room > 0:
            take = min(room, n)
            self.buffer[:, self.fill : self.fill + take] = x[:, :take]
            self.fill += take
            x = x[:, take:]
        if x.shape[1]:
            if x.shape[1] > M:
                x = x[:, torch.randperm(x.shape[1], generator=self.generator)[:M]]
            slots = torch.randperm(M, generator=self.generator)[: x.shape[1]]
            self.buffer[:, slots] = x

    def lr(self, step: int) -> float:
        c, total = self.config, self.total_steps
        scale = 1.0
        if c.warmup_steps > 0:
            scale = min(scale, (step + 1) / c.warmup_steps)
        decay = int(c.decay_fraction * total)
        if decay > 0 and step >= total - decay:
            scale = min(scale, (total - step) / decay)
        return c.lr * scale

    def owed_steps(self, final: bool) -> int:
        """Steps due so far: proportional to the vectors that have streamed in, all of them at the end."""
        if final:
            return self.total_steps
        return min(self.total_steps, (self.total_steps * self.vectors_in) // max(self.total_vectors, 1))

    def ready(self, final: bool) -> bool:
        return self.fill >= self.buffer.shape[1] or (final and self.fill >= 1)

    def initialize(self) -> None:
        """Initialize from (a random sample of at most INIT_VECTORS vectors of) the first reservoir fill."""
        sample = torch.randperm(self.fill, generator=self.generator)[:INIT_VECTORS]
        self.sae.initialize(self.buffer[:, : self.fill].index_select(1, sample).float(), self.generator)
        self.initialized = True

    def train_step(self) -> dict[str, torch.Tensor]:
        batch = torch.randint(self.fill, (self.config.batch_size,), generator=self.generator)
        stats = self.sae.step(self.buffer.index_select(1, batch).float(), self.steps_done, self.lr(self.steps_done))
        self.steps_done += 1
        self.last_stats = stats
        return stats

    def state_dict(self) -> dict:
        return {
            "sae": self.sae.state_dict(),
            "generator": self.generator.get_state(),
            "buffer": self.buffer[:, : self.fill].clone(),
            "counters": torch.tensor([self.fill, self.windows_done, self.vectors_in, self.steps_done,
                                      int(self.initialized)]),
            "seconds": torch.tensor([self.seconds[name] for name in _TIMERS], dtype=torch.float64),
        }

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.generator.set_state(state["generator"])
        fill, self.windows_done, self.vectors_in, self.steps_done, initialized = (int(v) for v in state["counters"])
        self.fill = fill
        self.buffer[:, :fill] = state["buffer"]
        self.initialized = bool(initialized)
        self.seconds = dict(zip(_TIMERS, (float(v) for v in state["seconds"])))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _per_layer(run: _Run, values: dict[str, list[float]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{stat: [S values]}`` -> ``{layer: {kind: {stat: mean over heads}}}``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for p, layer in enumerate(run.layers):
        out[str(layer)] = {}
        for kind_idx, kind in enumerate(KINDS):
            idx = [run.index(p, kind_idx, h) for h in range(run.hd)]
            out[str(layer)][kind] = {name: round(sum(v[i] for i in idx) / len(idx), 6) for name, v in values.items()}
    return out


def _summary(per_layer: dict, prefix: str) -> dict[str, float | int]:
    """Means over layers and the worst layer, per kind."""
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
    num_layers, heads, d = kv_geometry(model.config)
    layers = compressible_layers(model.config)
    fingerprint = {
        "train_config": config.weights_fingerprint(),
        "model": {"num_layers": num_layers, "heads": heads, "head_dim": d, "layers": layers},
        "text": {"path": str(text_path), "sha256": _sha256(text_path)},
        "eval_text": None if eval_text_path is None else str(text_path_of(eval_text_path)),
    }
    state_path, checkpoint_path, log_path = out_dir / STATE_NAME, out_dir / CHECKPOINT_NAME, out_dir / LOG_NAME
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("finished") and state.get("fingerprint") == json.loads(json.dumps(fingerprint)):
            return KVDictionary.load_folder(out_dir)

    # ----- the text: training windows, then held-out windows
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
    per_window = (config.context - config.skip_first) * (1 if config.per_head else heads)
    run = _Run(config, layers, heads, d, len(windows), per_window)
    collect_kwargs = dict(layers=layers, key_space=config.key_space, per_head=config.per_head,
                          batch_windows=config.batch_windows, skip_first=config.skip_first)

    # ----- resume
    log_bytes = 0
    if resume and checkpoint_path.is_file():
        payload = torch.load(checkpoint_path, weights_only=True)
        if payload["fingerprint"] != json.dumps(fingerprint, sort_keys=True):
            raise ValueError(
                f"{checkpoint_path} belongs to a different run (model, text or training config differ); pass "
                "resume=False to start over or use another out_dir"
            )
        run.load_state_dict(payload["run"])
        log_bytes = int(payload["log_bytes"])
    if log_path.exists():
        with open(log_path, "r+b") as handle:
            handle.truncate(log_bytes)
    for stale in (state_path, out_dir / EVALUATION_NAME) if not (resume and checkpoint_path.is_file()) else ():
        stale.unlink(missing_ok=True)
    log = open(log_path, "a")

    def write_log(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()

    def checkpoint() -> None:
        _save_checkpoint(checkpoint_path, {"fingerprint": json.dumps(fingerprint, sort_keys=True),
                                           "run": run.state_dict(), "log_bytes": log.tell()})

    # ----- held-out vectors (recomputed on resume: deterministic and small)
    eval_rng = torch.Generator().manual_seed(config.seed + 1)
    parts = [run.stack(batch.keys, batch.values) for batch in iter_kv(model, eval_windows, **collect_kwargs)]
    heldout = torch.cat(parts, dim=1)
    if heldout.shape[1] > config.eval_vectors:
        heldout = heldout[:, torch.randperm(heldout.shape[1], generator=eval_rng)[: config.eval_vectors]]

    def log_heldout(tag: str) -> None:
        fvu, cos = _evaluate_stack(run.sae, heldout, "topk")
        write_log({"event": "heldout", "tag": tag, "step": run.steps_done, "encoder": "topk",
                   "layers": _per_layer(run, {"fvu": fvu, "cos": cos})})

    bars = []
    collect_bar = tqdm(total=len(windows) * config.context, initial=run.windows_done * config.context,
                       desc="collect (tokens)", unit="tok", disable=not progress, dynamic_ncols=True)
    train_bar = tqdm(total=run.total_steps, initial=run.steps_done, desc="train (steps)", unit="step",
                     disable=not progress, dynamic_ncols=True)
    bars += [collect_bar, train_bar]
    last_checkpoint = run.steps_done

    def train_until(final: bool) -> None:
        nonlocal last_checkpoint
        if not run.initialized:
            if not run.ready(final):
                return
            run.initialize()
            log_heldout("init")
        while run.steps_done < run.owed_steps(final):
            start, cpu = time.perf_counter(), time.process_time()
            stats = run.train_step()
            run.seconds["train"] += time.perf_counter() - start
            run.seconds["train_cpu"] += time.process_time() - cpu
            train_bar.update(1)
            if run.steps_done % config.log_every == 0 or run.steps_done == run.total_steps:
                write_log({"event": "train", "step": run.steps_done, "lr": run.lr(run.steps_done - 1),
                           "tokens": run.windows_done * config.context,
                           "layers": _per_layer(run, {k: v.tolist() for k, v in stats.items()})})
                train_bar.set_postfix(fvu=f"{stats['fvu'].mean():.3f}", cos=f"{stats['cos'].mean():.3f}",
                                      dead=f"{stats['dead'].mean():.3f}")
            if config.eval_every and run.steps_done % config.eval_every == 0:
                log_heldout(f"step{run.steps_done}")
            if final and run.steps_done - last_checkpoint >= config.checkpoint_every:
                checkpoint()
                last_checkpoint = run.steps_done

    try:
        # ----- stream the text once, training as it comes
        if run.windows_done < len(windows):
            stream = iter_kv(model, windows[run.windows_done :], **collect_kwargs)
            while True:
                start, cpu = time.perf_counter(), time.process_time()
                batch = next(stream, None)
                run.seconds["collect"] += time.perf_counter() - start
                run.seconds["collect_cpu"] += time.process_time() - cpu
                if batch is None:
                    break
                run.insert(run.stack(batch.keys, batch.values))
                run.windows_done += batch.tokens // config.context
                collect_bar.update(batch.tokens)
                train_until(final=False)
                if run.steps_done - last_checkpoint >= config.checkpoint_every:
                    checkpoint()
                    last_checkpoint = run.steps_done
        train_until(final=True)
    finally:
        for bar in bars:
            bar.close()
        log.close()

    # ----- evaluate what will be saved (weights cast to the saved dtype), then save
    dtype = _DTYPES[config.dtype]
    with torch.no_grad():
        for p in (run.sae.W_enc, run.sae.b_enc, run.sae.W_dec, run.sae.b_dec):
            p.copy_(p.to(dtype).float())
    per_encoder = {}
    evaluation: dict = {"heldout_tokens": int(eval_windows.numel()), "heldout_vectors_topk": int(heldout.shape[1]),
                        "heldout_vectors_omp": int(min(heldout.shape[1], config.eval_vectors_omp))}
    start = time.perf_counter()
    for encoder in ("topk", "omp"):
        subset = heldout if encoder == "topk" else heldout[:, : config.eval_vectors_omp]
        fvu, cos = _evaluate_stack(run.sae, subset, encoder)
        per_encoder[encoder] = _per_layer(run, {"fvu": fvu, "cos": cos})
        evaluation.update(_summary(per_encoder[encoder], encoder))
    eval_seconds = time.perf_counter() - start
    with open(log_path, "a") as log:
        for encoder, per_layer in per_encoder.items():
            log.write(json.dumps({"event": "heldout", "tag": "final", "step": run.steps_done, "encoder": encoder,
                                  "layers": per_layer}) + "\n")

    rotary = {i: rotary_for_layer(model, i) for i in layers} if config.key_space == "pre_rope" else {}
    scalings = {round(s, 6) for _, s in rotary.values()}
    if len(scalings) > 1:
        raise ValueError(f"the compressed layers use different rotary attention scalings {sorted(scalings)}")
    base_model = config.base_model or getattr(model, "name_or_path", None) or model.config._name_or_path or "unknown"
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
            "text": text_path.name,
            "text_sha256": fingerprint["text"]["sha256"],
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
            "buffer_size": run.buffer_size,
            "init": config.init,
            "b_dec_init": config.b_dec_init,
            "eval_text": Path(eval_text_path).name if eval_text_path is not None
            else f"{text_path.name} (after the training tokens)",
            "collect_seconds": round(run.seconds["collect"], 1),
            "collect_cpu_seconds": round(run.seconds["collect_cpu"], 1),
            "train_seconds": round(run.seconds["train"], 1),
            "train_cpu_seconds": round(run.seconds["train_cpu"], 1),
            "eval_seconds": round(eval_seconds, 1),
        },
        evaluation=evaluation,
    )
    dictionary = KVDictionary(meta)
    with torch.no_grad():
        for p, layer in enumerate(layers):
            for kind_idx, kind in enumerate(KINDS):
                for h, sae in enumerate(dictionary[layer].saes(kind)):
                    s = run.index(p, kind_idx, h)
                    for name, tensor in sae.named_parameters():  # an "omp" dictionary holds no encoder
                        tensor.copy_(getattr(run.sae, name)[s])
            if layer in rotary:
                dictionary[layer].rope_inv_freq.copy_(rotary[layer][0])
    dictionary.save_pretrained(out_dir, dtype=None if dtype == torch.float32 else dtype)
    (out_dir / EVALUATION_NAME).write_text(json.dumps(
        {"summary": evaluation, "per_layer": per_encoder, "k_key": config.k_key, "k_value": config.k_value}, indent=1))
    state_path.write_text(json.dumps({"finished": True, "fingerprint": fingerprint}, indent=1))
    checkpoint_path.unlink(missing_ok=True)
    return KVDictionary.load_folder(out_dir)
