"""`bits_per_element=`: measured budgets in a dictionary's config, the choice among them, and the eval that records
and serves them (`sta-cache eval --record-budgets`, `--target-bits`)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_dictionary, tiny_model
from sta_cache import KVDictionary, SparseSemanticCache
from sta_cache.budgets import MeasuredBudget, best_budget, measured_budgets, record_budgets
from sta_cache.dictionary import DictionaryFormatError
from sta_cache.dtypes import coefficient_arguments
from sta_cache.evaluation import EvalConfig, cache_bytes, run_eval
from sta_cache.validation import per_layer_atoms

SHIPPED = "sta-cache/SmolLM2-135M-Instruct"
GEMMA = "sta-cache/gemma-3-270m"
# A quick eval on a tiny model: short prefill and chunks, STA rows only
TINY_EVAL = dict(
    prefill=32,
    chunk=16,
    residual_length=16,
    num_sink_tokens=2,
    paths=["sta"],
    baselines=[],
    passkey_trials=0,
    progress=False,
)


def budget(k_key: int, k_value: int, bits: float, ratio: float, dtype: str = "float8_e4m3fn") -> MeasuredBudget:
    return MeasuredBudget(k_key, k_value, dtype, True, bits, ratio, ratio + 0.01, "test")


def test_the_lowest_ratio_at_or_under_the_bits_is_chosen() -> None:
    budgets = [budget(4, 8, 1.8, 1.04), budget(7, 6, 1.96, 1.021), budget(8, 8, 2.33, 1.013), budget(12, 12, 3.5, 1.0)]
    assert best_budget(budgets, 2.0).k_key == 7
    assert best_budget(budgets, 1.96).k_key == 7  # "at or under"
    assert best_budget(budgets, 1.95).k_key == 4
    assert best_budget(budgets, 10).k_key == 12
    tie = [budget(12, 12, 3.5, 1.001), budget(14, 12, 3.8, 1.001)]
    assert best_budget(tie, 4).k_key == 12  # fewer bits on a tie
    with pytest.raises(ValueError, match=r"fits 1.5 bits per element; the smallest is 4/8, float8_e4m3fn, packed"):
        best_budget(budgets, 1.5)
    with pytest.raises(ValueError, match="records no measured budgets.*--record-budgets"):
        best_budget([], 2)
    with pytest.raises(ValueError, match="bits_per_element"):
        best_budget(budgets, -1)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"k_key": 0}, "k_key"),
        ({"coefficient_dtype": "int16"}, "coefficient_dtype"),
        ({"pack_indices": "yes"}, "pack_indices"),
        ({"bits_per_element": -2.0}, "bits_per_element"),
        ({"ppl_ratio": float("nan")}, "ppl_ratio"),
    ],
)
def test_a_bad_measured_budget_is_refused_by_name(change, error) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        MeasuredBudget(**{**budget(8, 8, 2.3, 1.01).to_dict(), **change})


@pytest.mark.parametrize(
    "name, bits", [(SHIPPED, 2), (SHIPPED, 2.5), (SHIPPED, 3), (SHIPPED, 3.5), (GEMMA, 2), (GEMMA, 3)]
)
def test_the_shipped_dictionary_serves_a_size_and_stores_what_it_recorded(name, bits) -> None:
    """The recorded bits per element are the cache's real stored bytes: fill a cache with the chosen setting and
    count its tensors (Gemma-3's choices store values rotated, 256 dims each)."""
    dictionary = KVDictionary.from_pretrained(name)
    cache = SparseSemanticCache(dictionary, bits_per_element=bits)
    chosen = cache.budget
    assert chosen.bits_per_element <= bits
    assert chosen == best_budget(dictionary.config.measured_budgets, bits)
    assert all(
        other.ppl_ratio >= chosen.ppl_ratio
        for other in dictionary.config.measured_budgets
        if other.bits_per_element <= bits
    )
    meta = dictionary.config
    layers = len(meta.layer_indices)
    k_key = per_layer_atoms("k_key", chosen.k_key, layers, meta.n_atoms)  # a per-layer budget, or one for all
    k_value = per_layer_atoms("k_value", chosen.k_value, layers, meta.n_atoms) if chosen.value_bits is None else None
    for j, layer in enumerate(cache.sparse_layers):
        assert (layer.k["key"], layer.value_bits) == (k_key[j], chosen.value_bits)
        assert layer.k["value"] == (layer.head_dim if k_value is None else k_value[j])
    layer = cache.sparse_layers[0]
    storage = coefficient_arguments(chosen.coefficient_dtype)
    assert layer.requested_coefficient_dtype == storage["coefficient_dtype"] and layer.pack_indices
    assert layer.coefficient_bits == storage["coefficient_bits"]
    generator = torch.Generator().manual_seed(int(bits * 10))
    for i in range(meta.num_layers):
        states = torch.randn(1, meta.num_kv_heads, 90, meta.head_dim, generator=generator)
        cache.update(states, states.clone(), i)
    assert cache_bytes(cache)["bits_per_element"] == pytest.approx(chosen.bits_per_element, abs=1e-4)


def test_bits_per_element_is_one_choice_not_four() -> None:
    dictionary = KVDictionary.from_pretrained(SHIPPED)
    with pytest.raises(ValueError, match="do not also pass k_key, pack_indices"):
        SparseSemanticCache(dictionary, bits_per_element=3, k_key=8, pack_indices=False)
    with pytest.raises(ValueError, match="do not also pass coefficient_bits"):
        SparseSemanticCache(dictionary, bits_per_element=3, coefficient_bits=4)
    with pytest.raises(ValueError, match="smallest is 4/8"):
        SparseSemanticCache(dictionary, bits_per_element=1)
    assert SparseSemanticCache(dictionary).budget is None


def test_a_dictionary_without_measurements_says_how_to_make_them(tmp_path) -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="records no measured budgets"):
        SparseSemanticCache(make_dictionary(model, encoder="omp"), bits_per_element=3)


def test_measured_budgets_are_checked_when_the_dictionary_loads(tmp_path) -> None:
    dictionary = make_dictionary(tiny_model("llama"), encoder="omp")
    dictionary.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for measured, error in (
        ([{**budget(2, 4, 3.0, 1.01).to_dict(), "k_value": 10_000}], "k_value"),
        ([{"k_key": 2}], "wrong fields"),
        ({"k_key": 2}, "list of JSON objects"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**config, "measured": measured}))
        with pytest.raises(DictionaryFormatError, match=error):
            KVDictionary.from_pretrained(tmp_path)


def test_eval_records_budgets_and_serves_them_by_target_bits(tmp_path) -> None:
    """The loop a user runs: evaluate settings with --record-budgets into the dictionary folder, then ask for a
    size with --target-bits (and bits_per_element=) and get the recorded setting that fits it best."""
    from test_analyze_eval import CharTokenizer, _ids

    model = tiny_model("llama")
    folder = tmp_path / "dictionary"
    make_dictionary(model, encoder="omp").save_pretrained(folder)
    dictionary = KVDictionary.from_pretrained(folder)
    texts = [_ids(80, seed=s)[0] for s in range(2)]
    common = dict(dictionary=str(folder), **TINY_EVAL)
    first = run_eval(
        EvalConfig(out=str(tmp_path / "a"), budgets=[(2, 2), (4, 4), (8, 8)], record_budgets=True, **common),
        model=model,
        tokenizer=CharTokenizer(),
        dictionary=dictionary,
        texts=texts,
    )
    recorded = KVDictionary.from_pretrained(folder).config.measured_budgets
    assert [(b.k_key, b.k_value) for b in recorded] == [(2, 2), (4, 4), (8, 8)]  # sorted by bits
    rows = {(row["params"]["k_key"], row["params"]["k_value"]): row for row in first["rows"][1:]}
    for b in recorded:
        row = rows[b.k_key, b.k_value]
        assert b.bits_per_element == pytest.approx(row["bits_per_element"], abs=1e-4)
        assert b.ppl_ratio == pytest.approx(row["ppl_ratio"], abs=1e-4)
        assert b.worst_text_ratio == pytest.approx(max(row["ppl_ratio_per_text"]), abs=1e-4)
        assert b.coefficient_dtype == "float8_e4m3fn" and b.pack_indices
        assert "2 texts" in b.evaluation and "window 16 + 2 sinks" in b.evaluation
    target = recorded[1].bits_per_element + 0.01
    expected = best_budget(recorded, target)
    second = run_eval(
        EvalConfig(out=str(tmp_path / "b"), target_bits=[target, 0.01], budgets=[], **common),
        model=model,
        tokenizer=CharTokenizer(),
        dictionary=KVDictionary.from_pretrained(folder),
        texts=texts,
    )
    served, too_small = second["rows"][1:]
    assert served["name"].startswith(f"STA <= {target:g} bits: {expected.k_key}/{expected.k_value}, fp8")
    assert served["params"]["target_bits"] == target
    assert served["bits_per_element"] == pytest.approx(expected.bits_per_element, abs=1e-4)
    assert served["bits_per_element"] <= target
    assert not too_small["available"] and "smallest is 2/2" in too_small["reason"]
    # measuring a setting again replaces its row and keeps the others
    again = record_budgets(folder, [budget(4, 4, recorded[1].bits_per_element, 1.5)])
    assert [(b.k_key, b.ppl_ratio) for b in again][1] == (4, 1.5) and len(again) == 3
    assert [(b.k_key, b.k_value) for b in measured_budgets(second)] == [(expected.k_key, expected.k_value)]


@pytest.mark.parametrize("rotated_values", [False, True])
def test_level_coefficients_are_evaluated_recorded_and_served(tmp_path, rotated_values) -> None:
    """`--coefficient-dtypes int4` evaluates coefficient_bits=4 caches, `--budgets 4/r3` caches with values rotated
    at 3 bits; recorded, such a budget is served by bits_per_element= as it was measured, storing the bits it
    measured."""
    from test_analyze_eval import CharTokenizer, _ids

    model = tiny_model("llama")
    folder = tmp_path / "dictionary"
    make_dictionary(model, encoder="omp").save_pretrained(folder)
    result = run_eval(
        EvalConfig(
            out=str(tmp_path / "eval"),
            dictionary=str(folder),
            budgets=[] if rotated_values else [(4, 4)],
            rotated_budgets=[(4, 3)] if rotated_values else [],
            coefficient_dtypes=["int4", "float8_e4m3fn"],
            record_budgets=True,
            **TINY_EVAL,
        ),
        model=model,
        tokenizer=CharTokenizer(),
        dictionary=KVDictionary.from_pretrained(folder),
        texts=[_ids(80, seed=s)[0] for s in range(2)],
    )
    levels, floats = result["rows"][1:]
    split = "4/r3" if rotated_values else "4/4"
    assert levels["name"] == f"STA {split}, int4 (sta)" and levels["params"]["coefficient_dtype"] == "int4"
    assert levels["bits_per_element"] < floats["bits_per_element"]
    recorded = {b.coefficient_dtype: b for b in KVDictionary.from_pretrained(folder).config.measured_budgets}
    assert recorded["int4"].bits_per_element == pytest.approx(levels["bits_per_element"], abs=1e-4)
    assert recorded["int4"].value_bits == (3 if rotated_values else None) and recorded["int4"].split == split
    dictionary = KVDictionary.from_pretrained(folder)
    cache = SparseSemanticCache(dictionary, bits_per_element=recorded["int4"].bits_per_element)
    assert cache.budget.coefficient_dtype == "int4"
    assert all(layer.coefficient_bits == 4 for layer in cache.sparse_layers)
    assert all(layer.value_bits == (3 if rotated_values else None) for layer in cache.sparse_layers)
    generator = torch.Generator().manual_seed(0)
    for i in range(dictionary.config.num_layers):
        states = torch.randn(1, dictionary.config.num_kv_heads, 90, dictionary.config.head_dim, generator=generator)
        cache.update(states, states.clone(), i)
    assert cache_bytes(cache)["bits_per_element"] == pytest.approx(recorded["int4"].bits_per_element, abs=1e-4)


def test_eval_refuses_to_record_into_a_hub_dictionary(tmp_path) -> None:
    with pytest.raises(ValueError, match="is not a dictionary folder .no config.json., and budgets are recorded"):
        run_eval(EvalConfig(out=str(tmp_path), dictionary=SHIPPED, record_budgets=True))


def test_target_bits_alone_replace_the_default_budgets() -> None:
    assert EvalConfig.preset(False, target_bits=[2.0, 3.0]).budgets == []
    assert EvalConfig.preset(False, target_bits=[2.0], budgets=[(8, 8)]).budgets == [(8, 8)]
    assert EvalConfig.preset(False).budgets == [(4, 8), (8, 16), (16, 32)]
    with pytest.raises(ValueError, match="target bits per element must be positive"):
        EvalConfig(target_bits=[0])


def test_the_command_line_takes_sizes_and_refuses_to_record_into_a_hub_id(tmp_path, capsys) -> None:
    from sta_cache.cli import build_parser, main

    args = build_parser().parse_args(["eval", "--dictionary", SHIPPED, "--out", "o", "--target-bits", "2,3.5"])
    assert args.target_bits == [2.0, 3.5] and args.record_budgets is None
    code = main(["eval", "--dictionary", SHIPPED, "--out", str(tmp_path), "--record-budgets"])
    assert code == 2 and "is not a dictionary folder" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()  # refused before anything ran


def test_the_command_line_takes_rotated_value_budgets() -> None:
    """`--budgets 8/16,10/r3,12` gives atom budgets 8/16 and 12/12 and one with values rotated at 3 bits."""
    from sta_cache.cli import _eval_options, build_parser

    args = build_parser().parse_args(["eval", "--dictionary", SHIPPED, "--out", "o", "--budgets", "8/16,10/r3,12"])
    config = EvalConfig.preset(False, **_eval_options(args))
    assert config.budgets == [(8, 16), (12, 12)] and config.rotated_budgets == [(10, 3)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--dictionary", SHIPPED, "--out", "o", "--budgets", "10/x3"])


def test_the_default_eval_shows_the_sizes_a_dictionary_serves_when_it_records_budgets() -> None:
    """Our storage at its best beside the fixed budgets: a dictionary that records measured budgets gets the rows
    bits_per_element=2 and 3 serve; one that records none gets no row that could only say so; an explicit
    --target-bits list (empty too) is taken as given."""
    from sta_cache.evaluation.specs import cache_specs

    model = tiny_model("llama")
    shipped = KVDictionary.from_pretrained(SHIPPED)
    names = [spec.name for spec in cache_specs(model, shipped, EvalConfig(baselines=[]))]  # paths sta and sdpa
    sizes = [name for name in names if "<=" in name]
    assert len(sizes) == 2 and all(name.endswith("(sta)") for name in sizes)  # the storage, on one path
    for bits, name in zip((2, 3), sizes, strict=True):
        assert name.startswith(f"STA <= {bits} bits: {best_budget(shipped.config.measured_budgets, bits).split}, ")
    plain = make_dictionary(model)
    assert not [s for s in cache_specs(model, plain, EvalConfig(baselines=[])) if "<=" in s.name]
    assert not [s for s in cache_specs(model, shipped, EvalConfig(baselines=[], target_bits=[])) if "<=" in s.name]
