"""The cache configurations ``sta-cache eval`` compares: DynamicCache, SparseSemanticCache budgets, the quantizer
baselines of :mod:`sta_cache.baselines` and transformers' QuantizedCache backends, each with how to build a fresh
cache.

Baselines are named ``backend:bits`` (``quanto:4``, ``hqq:2``, ``fp8``), ``rotated:BITS`` (the rotated Lloyd-Max
quantizer, e.g. ``rotated:2.5``; one run per rotation seed, averaged) and ``kivi:BITS[:GROUP]`` (group 32 unless
given).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import Cache

from .. import geometry
from ..allocation import LayerSensitivity, allocate, code_bytes_per_vector_pair
from ..baselines import KiviCache, RotatedQuantizedCache
from ..baselines.kivi import DEFAULT_GROUP
from ..baselines.rotated import split_bits
from ..budgets import best_budget, budget_split
from ..cache import SparseSemanticCache
from ..configs import EvalConfig
from ..dtypes import SHORT_NAMES, coefficient_arguments
from ..layer import atom_code_bytes
from .bytes import cache_bytes
from .passkey import feed

__all__ = ["CacheSpec", "cache_specs"]


@dataclass
class CacheSpec:
    """One row of the eval table: how to build a fresh cache of it (``make``), or why it cannot be built here."""

    name: str
    family: str  # dynamic | sta | rotated | kivi | quantized
    attn: str  # the model's attention implementation while it runs
    make: Callable[..., Cache] | None  # make(seed=s) for each of ``seeds`` when there are seeds, else make()
    params: dict
    reason: str | None = None  # why it is unavailable
    seeds: list[int] = field(default_factory=list)  # runs averaged into the row (the rotated quantizer's draws)


def cache_specs(model, dictionary, config: EvalConfig, sensitivity: LayerSensitivity | None = None) -> list[CacheSpec]:
    """The configurations to run, in table order. Baselines that cannot be built here come back with a reason.
    ``sensitivity`` allocates the per-layer rows of ``config.allocate_bits``."""
    specs = [
        CacheSpec(
            "DynamicCache",
            "dynamic",
            "sdpa",
            lambda: DynamicCache(config=model.config),
            {"dtype": _dtype_name(model.dtype)},
        )
    ]
    sdpa_budgets = None if config.sdpa_budgets is None else {tuple(b) for b in config.sdpa_budgets}
    splits = [(k_key, k_value, None) for k_key, k_value in config.budgets]  # (k_key, k_value, value_bits)
    splits += [(k_key, None, value_bits) for k_key, value_bits in config.rotated_budgets]
    for k_key, k_value, value_bits in splits:
        for dtype_name in config.coefficient_dtypes:
            for path in config.paths:
                if path == "sdpa" and sdpa_budgets is not None and (k_key, k_value) not in sdpa_budgets:
                    continue
                storage = dict(k_key=k_key, k_value=k_value, value_bits=value_bits, **coefficient_arguments(dtype_name))
                dtype_label = f", {SHORT_NAMES[dtype_name]}" if dtype_name else ""
                params = dict(
                    k_key=k_key,
                    k_value=k_value,
                    value_bits=value_bits,
                    coefficient_dtype=dtype_name or _dtype_name(model.dtype),
                )
                specs.append(
                    _sta_spec(
                        model,
                        dictionary,
                        config,
                        f"STA {budget_split(k_key, k_value, value_bits)}{dtype_label} ({path})",
                        path,
                        {**storage, "pack_indices": config.pack_indices},
                        {**params, "pack_indices": config.pack_indices},
                    )
                )
    for bits in config.allocate_bits:
        for dtype_name in config.coefficient_dtypes:
            specs.extend(_allocated_specs(model, dictionary, config, sensitivity, bits, dtype_name))
    # the default sizes show the storage, so they run on the "sta" path alone when it is one of the paths
    size_paths = config.paths if config.target_bits is not None or "sta" not in config.paths else ["sta"]
    for bits in config.sizes(bool(dictionary.config.measured)):
        try:
            budget = best_budget(dictionary.config.measured_budgets, bits)
        except ValueError as error:
            specs.append(CacheSpec(f"STA <= {bits:g} bits", "sta", "sta", None, {"target_bits": bits}, str(error)))
            continue
        for path in size_paths:
            label = f"STA <= {bits:g} bits: {budget.split}, {SHORT_NAMES[budget.coefficient_dtype]}"
            specs.append(
                _sta_spec(
                    model,
                    dictionary,
                    config,
                    f"{label} ({path})",
                    path,
                    {"bits_per_element": bits},
                    {**budget.cache_arguments(), "coefficient_dtype": budget.coefficient_dtype, "target_bits": bits},
                )
            )
    for baseline in config.baselines:
        backend = baseline.partition(":")[0]
        make_spec = {"rotated": _rotated_spec, "kivi": _kivi_spec}.get(backend, _quantized_spec)
        specs.append(make_spec(model, baseline, config))
    return specs


def _allocated_specs(
    model, dictionary, config: EvalConfig, sensitivity: LayerSensitivity, bits: float, dtype_name: str | None
) -> list[CacheSpec]:
    """The rows of one ``--allocate-bits`` target: atoms per layer and kind that fit ``bits`` per element with
    coefficients stored as ``dtype_name``, chosen by :func:`~sta_cache.allocation.allocate`."""
    meta = dictionary.config
    storage = coefficient_arguments(dtype_name)
    vector_bytes = partial(
        atom_code_bytes,
        n_atoms=meta.n_atoms,
        pack_indices=config.pack_indices,
        coefficient_dtype=storage["coefficient_dtype"] or model.dtype,
        coefficient_bits=storage["coefficient_bits"],
    )
    dtype_label = f", {SHORT_NAMES[dtype_name]}" if dtype_name else ""
    try:
        k_key, k_value = allocate(sensitivity, vector_bytes, code_bytes_per_vector_pair(bits, meta))
    except ValueError as error:
        name = f"STA per layer for {bits:g} bits{dtype_label}"
        return [CacheSpec(name, "sta", "sta", None, {"allocated_bits": bits}, str(error))]
    params = dict(
        k_key=k_key,
        k_value=k_value,
        value_bits=None,
        coefficient_dtype=dtype_name or _dtype_name(model.dtype),
        pack_indices=config.pack_indices,
        allocated_bits=bits,
    )
    split = budget_split(k_key, k_value, None)
    return [
        _sta_spec(
            model,
            dictionary,
            config,
            f"STA {split} for {bits:g} bits{dtype_label} ({path})",
            path,
            {"k_key": k_key, "k_value": k_value, **storage, "pack_indices": config.pack_indices},
            params,
        )
        for path in config.paths
    ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _sta_spec(model, dictionary, config: EvalConfig, name: str, path: str, storage: dict, params: dict) -> CacheSpec:
    """A SparseSemanticCache row: ``storage`` are its storage arguments (budget, coefficient dtype, packing, or
    ``bits_per_element``), ``params`` what the table records of them."""

    def make() -> Cache:
        return SparseSemanticCache(
            dictionary,
            config=model.config,
            value_pursuit=config.value_pursuit,
            residual_length=config.residual_length,
            num_sink_tokens=config.num_sink_tokens,
            **storage,
        )

    return CacheSpec(
        name,
        "sta",
        path,
        make,
        {
            **params,
            "window": config.residual_length,
            "sinks": config.num_sink_tokens,
            "n_atoms": dictionary.config.n_atoms,
            "encoder": dictionary.config.encoder,
            "value_pursuit": config.value_pursuit,
        },
    )


def _rotated_spec(model, baseline: str, config: EvalConfig) -> CacheSpec:
    bits = float(baseline.partition(":")[2] or 3)
    window = dict(residual_length=config.residual_length, num_sink_tokens=config.num_sink_tokens)
    RotatedQuantizedCache(model.config, bits, **window)  # a bad rate is refused here, before anything runs

    def make(seed: int) -> Cache:
        return RotatedQuantizedCache(model.config, bits, seed=seed, **window)

    base, wide = split_bits(bits, geometry.head_dim(model.config.get_text_config()))
    channels = (
        f"{wide} x {base + 1} + " if wide else ""
    ) + f"{geometry.head_dim(model.config.get_text_config()) - wide} x {base}"
    params = {"bits": bits, "channel_bits": channels, "window": config.residual_length, "sinks": config.num_sink_tokens}
    return CacheSpec(f"Rotated {bits:g}-bit", "rotated", "sdpa", make, params, seeds=list(config.rotation_seeds))


def _kivi_spec(model, baseline: str, config: EvalConfig) -> CacheSpec:
    _, bits, group = (baseline.split(":") + ["", ""])[:3]
    bits, group = int(bits or 2), int(group or DEFAULT_GROUP)
    window = dict(residual_length=config.residual_length, num_sink_tokens=config.num_sink_tokens)
    KiviCache(model.config, bits, group=group, **window)  # a bad group is refused here

    def make() -> Cache:
        return KiviCache(model.config, bits, group=group, **window)

    params = {"bits": bits, "group": group, "window": config.residual_length, "sinks": config.num_sink_tokens}
    return CacheSpec(f"KIVI-{bits} g{group}", "kivi", "sdpa", make, params)


def _quantized_spec(model, baseline: str, config: EvalConfig) -> CacheSpec:
    backend, _, bits = baseline.partition(":")
    if backend == "fp8":
        name, params = "QuantizedCache fp8", {"backend": "fp8", "scale": "per-tensor"}
        kwargs = {}
    else:
        nbits = int(bits or 4)
        name = f"QuantizedCache {backend} int{nbits}"
        kwargs = dict(nbits=nbits, q_group_size=config.q_group_size, residual_length=config.residual_length)
        params = {"backend": backend, **kwargs}

    def make():
        return QuantizedCache(backend=backend, config=model.config, **kwargs)

    spec = CacheSpec(name, "quantized", "sdpa", make, params)
    try:  # build it and run a short sequence through it: import errors and CPU-only failures show up here
        model.set_attn_implementation("sdpa")
        cache = make()
        ids = torch.arange(8, 8 + 2 * config.residual_length + 8, device=model.device).view(1, -1) % 1000
        with torch.no_grad():
            feed(model, ids, cache, prefill=config.residual_length + 4, chunk=8)
        cache_bytes(cache)
    except Exception as error:  # noqa: BLE001 - any failure makes the baseline unavailable, with its reason
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        spec.make, spec.reason = None, f"{type(error).__name__}: {first}"[:300]
    return spec
