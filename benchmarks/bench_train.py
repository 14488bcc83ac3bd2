"""Training-cost benchmark: what one MOD iteration costs per dictionary, and what a whole `sta-cache train` would
cost for models of other sizes.

Times one MOD iteration (OMP codes of ``--vectors`` vectors over N atoms, the least-squares statistics, the solve
and the refit: ``sta_cache.training.mod.mod_step``) on random unit-norm atoms and Gaussian vectors for each
head_dim and k, on one thread (``time.thread_time``: what one process of a ``torchrun`` job pays, whatever else
runs on the machine). Then projects the MOD time of a whole run, ``dictionaries x iterations x seconds per
iteration``, with the work split over P processes (``--processes``), and the memory of the training sample
(``vectors x head_dim x 4`` bytes per dictionary, the part that grows with the model; the model itself comes on
top). The projection divides everything by P, though every process solves the N x N system itself (about 0.03 s
of an iteration at N = 1024); collection (forwards of the model over the training text, split the same way) is not
projected: it depends on the model's own speed. Writes ``--out`` (JSON) if given and prints the tables.

    python benchmarks/bench_train.py --out docs/bench/train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from bench_memory import versions

from sta_cache.training.mod import mod_step


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    kv_heads: int
    head_dim: int


MODELS = (
    ModelShape("SmolLM2-135M", 30, 3, 64),
    ModelShape("Llama-3-8B", 32, 8, 128),
    ModelShape("Llama-3-70B", 80, 8, 128),
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="vector widths to time")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16], help="k of keys and of values")
    p.add_argument("--vectors", type=int, default=16000, help="training vectors per dictionary")
    p.add_argument("--atoms", type=int, default=1024, help="atoms per dictionary (N)")
    p.add_argument("--iterations", type=int, default=6, help="MOD iterations of the projected runs")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 8], help="process counts of the projection")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per cell; the table gives their median")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def time_step(d: int, k: int, args: argparse.Namespace) -> float:
    """Median thread seconds of one MOD iteration on one thread (what a process of a ``torchrun`` job pays;
    thread time, so other work on the machine does not count)."""
    generator = torch.Generator().manual_seed(d * 100 + k)
    x = torch.randn(args.vectors, d, generator=generator)
    atoms = F.normalize(torch.randn(args.atoms, d, generator=generator), dim=-1)
    bias = torch.zeros(d)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    mod_step(x, atoms, bias, k)  # builds the C kernels and warms the caches
    samples = []
    for _ in range(args.repeats):
        start = time.thread_time()
        mod_step(x, atoms, bias, k)
        samples.append(time.thread_time() - start)
    torch.set_num_threads(previous)
    return statistics.median(samples)


def main() -> None:
    args = parse_args()
    steps = {(d, k): time_step(d, k, args) for d in args.head_dims for k in args.ks}
    print(f"one MOD iteration, {args.vectors} vectors, N = {args.atoms}:")
    print("| head_dim | k | seconds, one thread |\n| ---: | ---: | ---: |")
    for (d, k), seconds in steps.items():
        print(f"| {d} | {k} | {seconds:.3f} |")

    projections = []
    for model in MODELS:
        if not any(d == model.head_dim for d, _ in steps):
            continue
        per_layer = sum(steps[model.head_dim, k] for k in args.ks[:2]) * args.iterations
        for processes in args.processes:
            projections.append(
                {
                    "model": model.name,
                    "dictionaries": model.layers * 2,
                    "processes": processes,
                    "mod_seconds_per_layer": round(per_layer, 2),
                    "mod_minutes": round(model.layers * per_layer / processes / 60, 1),
                    "sample_mib": round(model.layers * 2 * args.vectors * model.head_dim * 4 / 2**20, 1),
                    "per_head_sample_mib": round(
                        model.layers * 2 * model.kv_heads * args.vectors * model.head_dim * 4 / 2**20, 1
                    ),
                }
            )
    print(
        f"\nprojected MOD time ({args.iterations} iterations, shared dictionaries, one thread per process, "
        "data split: each process codes 1/P of every sample) and sample memory:"
    )
    print("| model | dictionaries | processes | MOD s per layer (1 process) | MOD minutes | sample MiB (per-head) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for p in projections:
        print(
            f"| {p['model']} | {p['dictionaries']} | {p['processes']} | {p['mod_seconds_per_layer']} | "
            f"{p['mod_minutes']} | {p['sample_mib']} ({p['per_head_sample_mib']}) |"
        )
    if args.out:
        record = {
            "versions": versions(),
            "settings": vars(args),
            "steps": [{"head_dim": d, "k": k, "seconds_one_thread": t} for (d, k), t in steps.items()],
            "projections": projections,
        }
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main()
