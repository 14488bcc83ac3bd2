"""The Top-K SAEs of one training run, stacked: every dictionary (layer x {key, value} x head) trained as one.

Inference codes with :class:`sta_cache.sae.TopKSAE`, one ``nn.Module`` per dictionary. Training keeps the same
four parameters (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``) for ``S`` dictionaries stacked on a leading axis, so
that one batched step (one ``bmm``, one ``embedding_bag``, one Adam update) trains them all; :meth:`export` copies
dictionary ``s`` into a ``TopKSAE``. The encoder is the same (Top-K of ``(x - b_dec) @ W_enc + b_enc``, ReLU after
the Top-K); what only training needs lives here: the AuxK loss on dead atoms, the decoder kept on the unit sphere
through the Adam step, and a sparse backward through the chosen pre-activations.

Data-parallel over several processes (``reduce`` across them): every process starts from rank 0's
initialization, averages the gradients of its own batch with the others' before each Adam step and marks an atom
fired when it fired anywhere, so the processes hold the same weights throughout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..configs import TrainConfig
from ..metrics import EPS, mean_cosine, mean_squared_norm, variance
from ..sae import TopKSAE
from .reduction import LOCAL, Reduction

PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")

__all__ = ["PARAMETERS", "StackedTopKSAE", "geometric_median"]


class StackedTopKSAE:
    """``S`` independent Top-K SAEs trained as one: parameters stacked on a leading axis, dictionary ``s`` coding
    with ``ks[s]`` atoms."""

    def __init__(self, S: int, d: int, n_atoms: int, ks: list[int], config: TrainConfig, reduce: Reduction = LOCAL):
        self.S, self.d, self.N = S, d, n_atoms
        self.config = config
        self.reduce = reduce
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
            b_dec = geometric_median(data, mean)
        elif self.config.b_dec_init == "mean":
            b_dec = mean
        else:
            b_dec = torch.zeros_like(mean)
        self.b_dec.copy_(b_dec)
        self.var.copy_(variance(data).clamp_min(EPS))
        if self.config.init == "data":  # atoms start at random centred data points
            pick = (
                torch.stack([torch.randperm(M, generator=generator)[: self.N] for _ in range(S)])
                if M >= self.N
                else torch.randint(M, (S, self.N), generator=generator)
            )
            atoms = torch.gather(data, 1, pick[..., None].expand(-1, -1, d)) - b_dec[:, None]
            atoms += 1e-3 * atoms.norm(dim=-1, keepdim=True).mean() * torch.randn(atoms.shape, generator=generator)
        else:
            atoms = torch.randn(S, self.N, d, generator=generator)
        self.W_dec.copy_(atoms / atoms.norm(dim=-1, keepdim=True).clamp_min(EPS))
        self.W_enc.copy_(self.W_dec.transpose(1, 2))
        self.b_enc.zero_()
        # Scale W_enc so the initial codes reconstruct the data at the right size: with b_enc = 0 the Top-K choice
        # is scale invariant, so the least-squares scale of the decoded codes is exact. Without it, correlated
        # (data-initialised) atoms sum k overlapping projections and the first steps fight a k-fold overshoot.
        sample = data[:, : min(M, 4096)]
        centred = sample - b_dec[:, None]
        values, idx = torch.bmm(centred, self.W_enc).topk(self.kmax, dim=-1)
        coef = values.relu() * self.kmask[:, None]
        decoded = F.embedding_bag(
            (idx + self.offsets).reshape(-1, self.kmax),
            self.W_dec.reshape(-1, self.d),
            per_sample_weights=coef.reshape(-1, self.kmax),
            mode="sum",
        ).view_as(sample)
        scale = (centred * decoded).sum((1, 2)) / decoded.pow(2).sum((1, 2)).clamp_min(EPS)
        self.W_enc.mul_(scale.clamp_min(1e-6)[:, None, None])
        for tensor in (*self.params, self.var):  # every process starts from rank 0's initialization
            self.reduce.broadcast_(tensor)

    # ----------------------------------------------------------------------------- training
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
        decoded = F.embedding_bag(
            flat, self.W_dec.reshape(S * self.N, d), offsets, mode="sum", per_sample_weights=weights
        )
        recon = decoded[: S * B].view(S, B, d) + self.b_dec[:, None]
        err = x - recon
        mse = mean_squared_norm(err)  # [S]
        loss = (mse / self.var).sum()
        if len(with_dead):
            aux_recon = decoded[S * B :].view(len(with_dead), B, d)
            aux_mse = mean_squared_norm(err.detach()[with_dead] - aux_recon)
            loss = loss + self.config.aux_coef * (aux_mse / self.var[with_dead]).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for param in self.params:
                if param.grad is not None:
                    self.reduce.mean_(param.grad)
            grad, W = self.W_dec.grad, self.W_dec
            grad.sub_((grad * W).sum(-1, keepdim=True) * W)  # keep the step tangent to the unit sphere
        self.optimizer.step()
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(EPS))
            main = idx[..., :kmax].reshape(S, -1)
            fired = torch.zeros(S, self.N).scatter_add_(-1, main, (coef > 0).float().reshape(S, -1))
            fired = self.reduce.sum_(fired) > 0
            self.last_fired.masked_fill_(fired, step)
            return {
                "fvu": (mse.detach() / variance(x).clamp_min(EPS)),
                "cos": mean_cosine(recon.detach(), x),
                "dead": dead.float().mean(-1),
            }

    # ----------------------------------------------------------------------------- export
    @torch.no_grad()
    def round_to(self, dtype: torch.dtype) -> None:
        """Round the weights to ``dtype`` (kept in float32), so that what is evaluated is what will be saved."""
        for p in self.params:
            p.copy_(p.to(dtype).float())

    @torch.no_grad()
    def export(self, s: int, sae: TopKSAE) -> None:
        """Copy dictionary ``s`` into ``sae`` (a matching-pursuit ``TopKSAE`` holds no encoder: only its decoder)."""
        for name, tensor in sae.named_parameters():
            tensor.copy_(getattr(self, name)[s])

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            **{name: getattr(self, name).detach() for name in PARAMETERS},
            "var": self.var,
            "last_fired": self.last_fired,
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name in PARAMETERS:
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
def geometric_median(x: torch.Tensor, start: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm on ``x [S, M, d]`` for every ``S`` at once."""
    median = start.clone()
    for _ in range(iterations):
        weights = 1.0 / (x - median[:, None]).norm(dim=-1).clamp_min(1e-8)  # [S, M]
        median = (weights[..., None] * x).sum(1) / weights.sum(1, keepdim=True)
    return median
