"""Dictionary learning for matching-pursuit codes: the Method of Optimal Directions (Engan et al. 1999).

The cache codes vectors by orthogonal matching pursuit over the decoder, so the atoms are learned with that
pursuit as the inner step rather than through an encoder that inference never uses. Each iteration codes the
training vectors with OMP, refits all atoms at once by least squares, ``D = argmin ||X - C D||^2 =
(C^T C)^-1 C^T X``, renormalises them, and re-seeds unused atoms with the worst-reconstructed vectors.

Over several processes (``torchrun``) each process holds and codes its share of the training vectors; the
least-squares statistics ``C^T C`` and ``C^T X``, the bias update, the error sums and the re-seeding candidates
are summed or gathered over the processes, so the atoms equal one process's up to float summation order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..collect import iter_kv
from ..configs import TrainConfig
from ..dictionary import KINDS
from ..geometry import kv_geometry
from . import checkpoint
from .heldout import omp_codes
from .reduction import LOCAL, Reduction
from .result import DictionaryKey, MethodResult

__all__ = ["learn_mod_dictionary", "mod_step", "omp_reconstruct", "train_mod"]


@dataclass(frozen=True)
class Totals:
    """What the vectors of all processes sum to: their count, mean and squared deviation from the mean (the FVU's
    denominator)."""

    count: int
    mean: torch.Tensor
    deviation: float

    @classmethod
    def of(cls, x: torch.Tensor, reduce: Reduction = LOCAL) -> Totals:
        sums = reduce.sum_(torch.cat([x.sum(0, dtype=torch.float64), x.new_tensor([x.shape[0]], dtype=torch.float64)]))
        count = int(sums[-1])
        mean = (sums[:-1] / max(count, 1)).to(x.dtype)
        deviation = reduce.sum_((x - mean).pow(2).sum(dtype=torch.float64))
        return cls(count, mean, float(deviation))


def _decode(indices: torch.Tensor, coefficients: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nk,nkd->nd", coefficients.float(), atoms[indices])


def omp_reconstruct(x: torch.Tensor, atoms: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """``x [n, d]`` coded with ``k`` atoms by OMP over ``atoms [N, d]`` and ``bias [d]``, and decoded again."""
    return _decode(*omp_codes(x, atoms, bias, k), atoms) + bias


def _least_squares_statistics(indices: torch.Tensor, coefficients: torch.Tensor, centred: torch.Tensor, n_atoms: int):
    """``(C^T C [N, N], C^T X [N, d])`` of the sparse code matrix ``C`` without forming it: each code adds the
    outer product of its ``k`` coefficients and its coefficients times its vector. Summed in float64, so that the
    order of the sum (one process, or partial sums from several) changes no float32 bit of the solution but in
    rare ties."""
    k = indices.shape[1]
    c = coefficients.double()
    pairs = (indices[:, :, None] * n_atoms + indices[:, None, :]).reshape(-1)
    products = (c[:, :, None] * c[:, None, :]).reshape(-1)
    # bincount sums in a fixed order (index_put_ with accumulate does not on the CPU)
    gram = torch.bincount(pairs, weights=products, minlength=n_atoms * n_atoms).view(n_atoms, n_atoms)
    rhs = centred.new_zeros(n_atoms, centred.shape[1], dtype=torch.float64)
    vectors = centred.double()
    for slot in range(k):  # one [n, d] product per slot, not one [n k, d] block: a third of the time
        rhs.index_add_(0, indices[:, slot], c[:, slot, None] * vectors)
    return gram, rhs


def _worst_residuals(residual: torch.Tensor, count: int, reduce: Reduction) -> torch.Tensor:
    """The ``count`` residuals ``[<= count, d]`` of largest norm over all processes, largest first."""
    errors = residual.pow(2).sum(-1)
    top = errors.topk(min(count, errors.shape[0]))
    parts = reduce.gather((top.values.cpu(), residual[top.indices].cpu()))
    values = torch.cat([v for v, _ in parts])
    rows = torch.cat([r for _, r in parts])
    return rows[values.topk(min(count, values.shape[0])).indices].to(residual.device)


def mod_step(
    x: torch.Tensor,
    atoms: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    *,
    ridge: float = 1e-4,
    reduce: Reduction = LOCAL,
    totals: Totals | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One MOD iteration on this process's training vectors ``x [n, d]``; returns ``(atoms [N, d], bias [d], FVU
    of the training vectors of all processes)``. ``totals`` are :meth:`Totals.of` ``x`` (computed when not given)."""
    totals = totals or Totals.of(x, reduce)
    n_atoms = atoms.shape[0]
    indices, coefficients = omp_codes(x, atoms, bias, k)
    gram, rhs = _least_squares_statistics(indices, coefficients, x - bias, n_atoms)
    reduce.sum_(gram)
    reduce.sum_(rhs)
    usage = gram.diagonal().clone()
    gram.diagonal().add_(ridge * usage.mean().clamp_min(1e-6))
    new_atoms = reduce.broadcast_(torch.linalg.solve(gram, rhs).to(atoms.dtype))
    residual = x - _decode(indices, coefficients, new_atoms) - bias
    fvu = float(reduce.sum_(residual.pow(2).sum(dtype=torch.float64))) / max(totals.deviation, 1e-12)
    bias = bias + (reduce.sum_(residual.sum(0, dtype=torch.float64)) / totals.count).to(bias.dtype)
    unused = (usage <= 0).nonzero().flatten()
    if len(unused):  # re-seed dead atoms with the directions of the worst-coded vectors
        seeds = _worst_residuals(residual, len(unused), reduce)
        new_atoms[unused[: len(seeds)]] = seeds
    norms = new_atoms.norm(dim=-1, keepdim=True)
    new_atoms = torch.where(norms > 1e-8, new_atoms / norms.clamp_min(1e-8), atoms)
    return new_atoms, bias, fvu


def learn_mod_dictionary(
    x: torch.Tensor,
    atoms: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    iterations: int = 5,
    *,
    reduce: Reduction = LOCAL,
    progress: bool = False,
    desc: str = "MOD",
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Refine ``atoms [N, d]`` / ``bias [d]`` for k-sparse OMP codes of ``x [n, d]`` (this process's share of the
    training vectors); returns the per-iteration training FVU too."""
    history = []
    x, atoms, bias = x.float(), atoms.float().clone(), bias.float().clone()
    totals = Totals.of(x, reduce)
    for _ in tqdm(range(iterations), desc=desc, disable=not progress, leave=False):
        atoms, bias, fvu = mod_step(x, atoms, bias, k, reduce=reduce, totals=totals)
        history.append(fvu)
    return atoms, bias, history


class _Sample:
    """A random sample of one dictionary's training vectors, drawn before any is collected: slot ``j`` holds the
    vector numbered ``positions[j]`` in collection order. A process keeps the slots whose vectors it collects."""

    def __init__(self, total: int, vectors: int, n_atoms: int, generator: torch.Generator):
        self.positions = torch.randperm(total, generator=generator)[:vectors]
        self.seed_slots = torch.randperm(len(self.positions), generator=generator)[:n_atoms]
        order = self.positions.argsort()
        self._sorted, self._slot_of_sorted = self.positions[order], order
        self._slots: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []

    def take(self, first: int, x: torch.Tensor) -> None:
        """Keep the sampled ones among vectors ``x [n, d]``, numbered ``first .. first + n - 1``."""
        lo, hi = torch.searchsorted(self._sorted, torch.tensor([first, first + x.shape[0]])).tolist()
        if hi > lo:
            self._slots.append(self._slot_of_sorted[lo:hi])
            self._rows.append(x[self._sorted[lo:hi] - first])

    def local(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots [n], vectors [n, d])`` this process holds, in slot order."""
        if not self._rows:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, d)
        slots, rows = torch.cat(self._slots), torch.cat(self._rows)
        order = slots.argsort()
        return slots[order], rows[order]

    def seeds(self, slots: torch.Tensor, x: torch.Tensor, reduce: Reduction) -> torch.Tensor:
        """The sampled vectors in ``seed_slots`` ``[<= N, d]``, assembled from every process's share."""
        where = torch.full((len(self.positions),), -1, dtype=torch.long)
        where[slots] = torch.arange(len(slots))
        rows = where[self.seed_slots]
        held = rows >= 0
        seeds = x.new_zeros(len(self.seed_slots), x.shape[1])
        seeds[held] = x[rows[held]]
        return reduce.sum_(seeds)


def train_mod(
    model,
    windows: torch.Tensor,
    layers: list[int],
    config: TrainConfig,
    folder: checkpoint.RunFolder,
    *,
    reduce: Reduction = LOCAL,
    writer: bool = True,
    progress: bool = True,
) -> MethodResult:
    """Learn the atoms of every ``(layer, kind, head group)`` dictionary of ``layers`` from the model's keys and
    values over ``windows [n, context]``: collect a random sample of ``config.vectors`` vectors per dictionary,
    then ``config.iterations`` MOD iterations each. With ``reduce`` across processes, each process collects its
    contiguous share of the windows. After every dictionary the finished ones are checkpointed in ``folder`` (by
    the ``writer``), and a resumed run skips them."""
    _, heads, d = kv_geometry(model.config)
    groups = heads if config.per_head else 1
    per_window = (config.context - config.skip_first) * (heads // groups)
    total = len(windows) * per_window
    if min(total, config.vectors) < config.n_atoms:
        raise ValueError(
            f"{min(total, config.vectors)} training vectors per dictionary are fewer than n_atoms={config.n_atoms}: "
            "give more text (max_tokens) or vectors, or fewer atoms"
        )
    keys = [(i, kind, h) for i in layers for kind in KINDS for h in range(groups)]
    samples = {key: _Sample(total, config.vectors, config.n_atoms, _generator(config.seed, key)) for key in keys}
    done = _resumed(folder)
    todo = [key for key in keys if key not in done]
    world = distributed.world()
    share = world.shard(len(windows)) if reduce.across_processes else range(len(windows))
    seconds = {"collect": 0.0, "train": 0.0}
    start = time.perf_counter()
    if todo:
        _collect(model, windows, share, per_window, todo, samples, config, progress)
    seconds["collect"] = time.perf_counter() - start
    device = model.device
    bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc="MOD per dictionary", disable=not progress)
    for key in todo:
        layer, kind, head = key
        slots, x = samples[key].local(d)
        x = x.to(device)
        totals = Totals.of(x, reduce)
        seeds = samples[key].seeds(slots.to(device), x, reduce)
        k = config.k_key if kind == "key" else config.k_value
        atoms, bias, history = learn_mod_dictionary(
            x, F.normalize(seeds - totals.mean, dim=-1), totals.mean, k, config.iterations, reduce=reduce
        )
        done[key] = {"W_dec": atoms.cpu(), "b_dec": bias.cpu(), "fvu": torch.tensor(history)}
        if writer:
            folder.save_checkpoint({"done": {_name(key): value for key, value in done.items()}}, log_bytes=0)
        bar.update(1)
        bar.set_postfix(layer=layer, kind=kind, fvu=f"{history[-1]:.3f}")
    bar.close()
    seconds["train"] = time.perf_counter() - start - seconds["collect"]
    record = {
        "vectors_per_dictionary": min(total, config.vectors),
        "tokens_per_process": reduce.gather(len(share) * windows.shape[1]),
        **{f"{name}_seconds": round(value, 1) for name, value in seconds.items()},
    }
    weights = {key: {"W_dec": value["W_dec"], "b_dec": value["b_dec"]} for key, value in done.items()}
    train_fvu = {_name(key): round(float(value["fvu"][-1]), 5) for key, value in done.items()}
    return MethodResult(weights, record, report={"train_fvu": train_fvu})


def _collect(model, windows, share: range, per_window: int, todo, samples, config: TrainConfig, progress) -> None:
    """Stream this process's windows through the model and keep each dictionary's sampled vectors."""
    layers = sorted({layer for layer, _, _ in todo})
    batches = iter_kv(
        model,
        windows[share.start : share.stop],
        layers=layers,
        key_space=config.key_space,
        per_head=config.per_head,
        batch_windows=config.batch_windows,
        skip_first=config.skip_first,
    )
    first = share.start * per_window
    bar = tqdm(total=len(share) * windows.shape[1], desc="collect (tokens)", unit="tok", disable=not progress)
    for batch in batches:
        for key in todo:
            layer, kind, head = key
            x = (batch.keys if kind == "key" else batch.values)[layer][head]
            samples[key].take(first, x)
        first += batch.tokens // windows.shape[1] * per_window
        bar.update(batch.tokens)
    bar.close()


def _generator(seed: int, key: DictionaryKey) -> torch.Generator:
    """Each dictionary's own random stream, so that its sample does not depend on which other dictionaries a
    process trains (``shard="layers"`` gives the same atoms as one process)."""
    layer, kind, head = key
    return torch.Generator().manual_seed(seed * 1_000_003 + (layer * len(KINDS) + KINDS.index(kind)) * 1024 + head)


def _name(key: DictionaryKey) -> str:
    layer, kind, head = key
    return f"{layer}.{kind}.{head}"


def _resumed(folder: checkpoint.RunFolder) -> dict[DictionaryKey, dict[str, torch.Tensor]]:
    """The dictionaries a checkpoint in ``folder`` holds finished (none without one)."""
    if not folder.checkpoint.is_file():
        return {}
    done = folder.load_checkpoint()["run"]["done"]
    out = {}
    for name, value in done.items():
        layer, kind, head = name.split(".")
        out[int(layer), kind, int(head)] = value
    return out
