"""A size, not knobs: the storage settings a dictionary was measured at, and the best of them for a bits target.

A dictionary's ``config.json`` may list ``measured`` budgets: atoms per key and value (or the bits of rotated
values), coefficient dtype and index packing, each with the bits per element and the held-out perplexity ratio
that ``sta-cache eval`` measured for it (``sta-cache eval --record-budgets`` writes them).
``SparseSemanticCache(..., bits_per_element=B)`` serves the one with the lowest ratio at or under B bits. Bits per
element are measured from the cache's stored tensors (indices, coefficients and the positions of pre-RoPE codes;
:func:`evaluation.bytes.cache_bytes`), so a budget is a claim about this dictionary on the texts it was measured
on, not a formula.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .configs import CoefficientDtype, check_choice
from .dtypes import coefficient_arguments
from .validation import check_flag, check_int, check_positive_float

__all__ = [
    "MeasuredBudget",
    "NotADictionaryFolder",
    "best_budget",
    "budget_split",
    "check_dictionary_folder",
    "measured_budgets",
    "merged",
    "record_budgets",
    "write_config_field",
]


class NotADictionaryFolder(ValueError):
    """Budgets are recorded into a dictionary folder's config.json, and this is not one (a Hub id, a typo)."""


@dataclass(frozen=True)
class MeasuredBudget:
    """One storage setting of a dictionary and what it measured: ``bits_per_element`` of the compressed tokens,
    ``ppl_ratio`` (perplexity against DynamicCache over all texts) and its ``worst_text_ratio``, on ``evaluation``
    (which texts, how many tokens, which window). Values are ``k_value`` atoms, or rotated at ``value_bits`` bits
    per coordinate (then ``k_value`` is None). ``k_key`` / ``k_value`` are one int for every layer, or a tuple of
    one per dictionary layer (a per-layer allocation, :mod:`sta_cache.allocation`)."""

    k_key: int | tuple[int, ...]
    k_value: int | tuple[int, ...] | None
    coefficient_dtype: CoefficientDtype
    pack_indices: bool
    bits_per_element: float
    ppl_ratio: float
    worst_text_ratio: float
    evaluation: str = ""
    value_bits: int | None = None

    def __post_init__(self) -> None:
        for name in ("k_key", "k_value") if self.value_bits is None else ("k_key",):
            atoms = getattr(self, name)
            if isinstance(atoms, list):  # as JSON gives it
                object.__setattr__(self, name, atoms := tuple(atoms))
            for count in atoms if isinstance(atoms, tuple) else (atoms,):
                check_int(name, count, minimum=1)
        if self.value_bits is not None:
            check_int("value_bits", self.value_bits, minimum=2, maximum=8)
            if self.k_value is not None:
                raise ValueError(f"a budget with value_bits={self.value_bits} has no k_value, got {self.k_value}")
        check_choice("coefficient_dtype", self.coefficient_dtype, CoefficientDtype)
        check_flag("pack_indices", self.pack_indices)
        for name in ("bits_per_element", "ppl_ratio", "worst_text_ratio"):
            check_positive_float(name, getattr(self, name))
        if not isinstance(self.evaluation, str):
            raise TypeError(f"evaluation must be a string, got {self.evaluation!r}")

    @property
    def split(self) -> str:
        """``k_key/k_value``, or ``k_key/rB`` with values rotated at B bits."""
        return budget_split(self.k_key, self.k_value, self.value_bits)

    @property
    def label(self) -> str:
        packing = ", packed" if self.pack_indices else ""
        return f"{self.split}, {self.coefficient_dtype}{packing} ({self.bits_per_element:.2f} bits)"

    def cache_arguments(self) -> dict:
        """The ``SparseSemanticCache`` arguments of this setting."""
        return {
            "k_key": self.k_key,
            "k_value": self.k_value,
            "value_bits": self.value_bits,
            **coefficient_arguments(self.coefficient_dtype),
            "pack_indices": self.pack_indices,
        }

    def to_dict(self) -> dict:
        """The fields, ``value_bits`` only when set (configs written before it read the same)."""
        data = asdict(self)
        if self.value_bits is None:
            del data["value_bits"]
        return data


def budget_split(k_key: int | tuple[int, ...], k_value: int | tuple[int, ...] | None, value_bits: int | None) -> str:
    """How a setting splits its atoms, in the eval's words: ``8/16``, ``10/r3`` for values rotated at 3 bits, or
    ``per layer 7.6/8.4`` (the mean atoms per layer) for a per-layer allocation."""
    per_layer = isinstance(k_key, tuple) or isinstance(k_value, tuple)
    atoms = lambda k: f"{sum(k) / len(k):.1f}" if isinstance(k, tuple) else str(k)  # noqa: E731
    split = f"{atoms(k_key)}/{atoms(k_value)}" if value_bits is None else f"{atoms(k_key)}/r{value_bits}"
    return f"per layer {split}" if per_layer else split


def best_budget(budgets: list[MeasuredBudget], bits_per_element: float) -> MeasuredBudget:
    """The measured setting with the lowest perplexity ratio at or under ``bits_per_element`` (fewer bits on a
    tie). Raises ValueError when there is none, saying what was measured."""
    check_positive_float("bits_per_element", bits_per_element)
    if not budgets:
        raise ValueError(
            "this dictionary records no measured budgets, so bits_per_element has nothing to choose from: measure "
            "some with `sta-cache eval --dictionary DIR --budgets 8/8,12/12 --record-budgets`, or pass k_key, "
            "k_value, coefficient_dtype and pack_indices yourself"
        )
    fitting = [budget for budget in budgets if budget.bits_per_element <= bits_per_element]
    if not fitting:
        smallest = min(budgets, key=lambda budget: budget.bits_per_element)
        raise ValueError(
            f"no measured budget of this dictionary fits {bits_per_element} bits per element; the smallest is "
            f"{smallest.label}"
        )
    return min(fitting, key=lambda budget: (budget.ppl_ratio, budget.bits_per_element))


def measured_budgets(results: dict) -> list[MeasuredBudget]:
    """The SparseSemanticCache rows of a ``sta-cache eval`` results.json (attention path "sta") as measured
    budgets, described by the eval's texts and window."""
    config, texts = results["config"], results["texts"]
    evaluation = (
        f"{results['model']}: {texts['count']} texts ({texts['source']}) x {config['context']} tokens, prefill "
        f"{config['prefill']}, chunks of {config['chunk']}, window {config['residual_length']} + "
        f"{config['num_sink_tokens']} sinks"
    )
    budgets = []
    for row in results["rows"]:
        ratio, per_text = row.get("ppl_ratio"), row.get("ppl_ratio_per_text")
        if row.get("family") != "sta" or row.get("attn") != "sta" or ratio is None or not math.isfinite(ratio):
            continue
        params = row["params"]
        budgets.append(
            MeasuredBudget(
                k_key=params["k_key"],
                k_value=params["k_value"],
                value_bits=params.get("value_bits"),
                coefficient_dtype=params["coefficient_dtype"],
                pack_indices=params["pack_indices"],
                bits_per_element=round(row["bits_per_element"], 4),
                ppl_ratio=round(ratio, 4),
                worst_text_ratio=round(max(per_text), 4),
                evaluation=evaluation,
            )
        )
    return budgets


def merged(old: list[MeasuredBudget], new: list[MeasuredBudget]) -> list[MeasuredBudget]:
    """``old`` with every setting that ``new`` measured again replaced by the new measurement, sorted by bits."""
    setting = lambda budget: (  # noqa: E731
        budget.k_key,
        budget.k_value,
        budget.value_bits,
        budget.coefficient_dtype,
        budget.pack_indices,
    )
    by_setting = {setting(budget): budget for budget in old}
    by_setting.update({setting(budget): budget for budget in new})
    return sorted(by_setting.values(), key=lambda budget: (budget.bits_per_element, budget.ppl_ratio))


def check_dictionary_folder(directory: str | os.PathLike | None) -> Path:
    """The config.json of the dictionary folder ``directory``; NotADictionaryFolder if there is none."""
    path = Path(directory or "") / "config.json"
    if not path.is_file():
        raise NotADictionaryFolder(
            f"{str(directory)!r} is not a dictionary folder (no config.json), and budgets are recorded in one: save "
            "the dictionary to a folder (KVDictionary.save_pretrained) and evaluate that"
        )
    return path


def record_budgets(directory: str | os.PathLike, budgets: list[MeasuredBudget]) -> list[MeasuredBudget]:
    """Merge ``budgets`` into the ``measured`` list of the dictionary folder's config.json (a setting measured again
    replaces its old row; every other field is kept as it is) and return the list now recorded."""
    data = json.loads(check_dictionary_folder(directory).read_text())
    recorded = merged([MeasuredBudget(**row) for row in data.get("measured", [])], budgets)
    write_config_field(directory, "measured", [budget.to_dict() for budget in recorded])
    return recorded


def write_config_field(directory: str | os.PathLike, name: str, value) -> None:
    """Set one field of the dictionary folder's config.json, keeping every other field as it is."""
    path = check_dictionary_folder(directory)
    data = json.loads(path.read_text())
    data[name] = value
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)  # a reader sees the old file or the new one, never half of one
