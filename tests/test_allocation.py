"""Per-layer budgets: the allocator against brute force, the sensitivity it reads, and a cache that serves one."""

from __future__ import annotations

import itertools
import json
import math
from functools import partial

import pytest
import torch

from conftest import make_dictionary, tiny_model
from sta_cache import KVDictionary, SparseSemanticCache
from sta_cache.allocation import LayerSensitivity, allocate, code_bytes_per_vector_pair
from sta_cache.evaluation import EvalConfig, run_eval
from sta_cache.evaluation.bytes import cache_bytes
from sta_cache.evaluation.sensitivity import measure_sensitivity
from sta_cache.layer import atom_code_bytes


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_the_brute_force_optimum(seed) -> None:
    """Against every allocation that fits: random, not necessarily convex or decreasing costs, in the uneven byte
    steps of packed 10-bit indices and fp8 coefficients."""
    generator = torch.Generator().manual_seed(seed)
    atoms = (2, 3, 5, 8)
    table = lambda: [tuple(torch.rand(4, generator=generator).tolist()) for _ in range(3)]  # noqa: E731
    sensitivity = LayerSensitivity(atoms, {"key": table(), "value": table()})
    vector_bytes = lambda k: math.ceil(10 * k / 8) + k  # noqa: E731
    for bytes_per_pair in (10, 15.5, 22, 30):
        k_key, k_value = allocate(sensitivity, vector_bytes, bytes_per_pair)
        spent = sum(vector_bytes(k) for k in k_key + k_value)
        assert spent <= bytes_per_pair * 3

        def cost(keys, values):
            return sum(
                sensitivity.kl[kind][j][atoms.index(k)]
                for kind, ks in (("key", keys), ("value", values))
                for j, k in enumerate(ks)
            )

        best = min(
            cost(choice[:3], choice[3:])
            for choice in itertools.product(atoms, repeat=6)
            if sum(vector_bytes(k) for k in choice) <= bytes_per_pair * 3
        )
        assert cost(k_key, k_value) == pytest.approx(best, rel=1e-12)


def test_an_insensitive_layer_gives_its_atoms_to_a_sensitive_one() -> None:
    atoms = (4, 8, 16)
    sensitivity = LayerSensitivity(
        atoms,
        {"key": [(1e-6, 5e-7, 1e-7), (1e-2, 5e-3, 1e-3)], "value": [(1e-4, 5e-5, 1e-5), (1e-4, 5e-5, 1e-5)]},
    )
    k_key, k_value = allocate(sensitivity, lambda k: 2 * k, bytes_per_pair=2 * (8 + 8))
    assert k_key == (4, 16) and k_value == (8, 4) or k_key == (4, 16) and k_value == (4, 8)


def test_a_rising_tail_is_never_bought_and_one_costly_step_beats_two_cheap_ones() -> None:
    """Measured KL is noisy: 16 atoms measuring worse than 8 is never bought, whatever the budget. With 4 bytes to
    spend, 4 more key atoms (KL -0.8) beat 2 + 2 value atoms (-0.6), which a greedy spender would take first."""
    atoms = (4, 6, 8, 16)
    sensitivity = LayerSensitivity(atoms, {"key": [(1.0, 0.9, 0.2, 0.3)], "value": [(1.0, 0.5, 0.4, 0.35)]})
    k_key, k_value = allocate(sensitivity, lambda k: k, bytes_per_pair=100)
    assert k_key == (8,) and k_value == (16,)
    assert allocate(sensitivity, lambda k: k, bytes_per_pair=12) == ((8,), (4,))


def test_a_budget_below_the_fewest_atoms_is_refused() -> None:
    sensitivity = LayerSensitivity((4, 8), {"key": [(1.0, 0.5)], "value": [(1.0, 0.5)]})
    with pytest.raises(ValueError, match="cannot hold even 4 atoms"):
        allocate(sensitivity, lambda k: k, bytes_per_pair=7)


@pytest.mark.parametrize(
    "kl, error",
    [
        ({"key": [(1.0, 0.5)]}, "a table for each of"),
        ({"key": [(1.0, 0.5)], "value": [(1.0,)]}, "one value per entry of atoms"),
        ({"key": [(1.0, 0.5)], "value": [(1.0, 0.5), (1.0, 0.5)]}, "one row per dictionary layer"),
    ],
)
def test_a_malformed_sensitivity_is_refused(kl, error) -> None:
    with pytest.raises(ValueError, match=error):
        LayerSensitivity((4, 8), kl)
    with pytest.raises(ValueError, match="increasing"):
        LayerSensitivity((8, 4), {"key": [(1.0, 0.5)], "value": [(1.0, 0.5)]})


def test_sensitivity_is_zero_at_full_rank_and_positive_with_one_atom() -> None:
    """With the complete basis, head_dim atoms reproduce every vector and the model's predictions do not move; one
    atom moves them. Both kinds of every layer are measured."""
    model = tiny_model("llama")
    dictionary = make_dictionary(model, kind="exact", encoder="omp")
    d = dictionary.config.head_dim
    texts = [
        torch.randint(0, model.config.vocab_size, (48,), generator=torch.Generator().manual_seed(s)) for s in (0, 1)
    ]
    sensitivity = measure_sensitivity(
        model,
        dictionary,
        texts,
        atoms=(1, d),
        prefill=16,
        chunk=8,
        progress=False,
        cache_arguments={"residual_length": 4, "num_sink_tokens": 1},
    )
    assert sensitivity.num_layers == len(dictionary.config.layer_indices)
    for kind in ("key", "value"):
        for one_atom, full in sensitivity.kl[kind]:
            assert full < 1e-8 < one_atom
    restored = LayerSensitivity(**sensitivity.to_dict())
    assert restored == sensitivity


def test_a_cache_gives_each_layer_its_own_budget_and_stores_exactly_those_bytes() -> None:
    model = tiny_model("llama")
    dictionary = make_dictionary(model, n_atoms=96, encoder="omp")
    meta = dictionary.config
    k_key = [1 + i for i in range(len(meta.layer_indices))]
    k_value = [7 - i for i in range(len(meta.layer_indices))]
    cache = SparseSemanticCache(
        dictionary,
        config=model.config,
        k_key=k_key,
        k_value=k_value,
        coefficient_dtype=torch.float8_e4m3fn,
        pack_indices=True,
        residual_length=4,
        num_sink_tokens=0,
    )
    assert cache.k_key == tuple(k_key) and cache.k_value == tuple(k_value)
    assert [(layer.k["key"], layer.k["value"]) for layer in cache.sparse_layers] == list(
        zip(k_key, k_value, strict=True)
    )
    states = torch.randn(1, meta.num_kv_heads, 20, meta.head_dim)
    for i in range(meta.num_layers):
        cache.update(states, states.clone(), i)
    cache.flush()
    per_vector = lambda k: atom_code_bytes(  # noqa: E731
        k, meta.n_atoms, pack_indices=True, coefficient_dtype=torch.float8_e4m3fn
    )
    expected = sum(
        16 * meta.num_kv_heads * (per_vector(a) + per_vector(b)) for a, b in zip(k_key, k_value, strict=True)
    )
    assert cache_bytes(cache)["codes"] == expected


@pytest.mark.parametrize(
    "k_key, error, kind",
    [
        ([4], "one int for each of the dictionary's", ValueError),
        ([4, 4, 0], r"k_key\[2\] must be an int from 1", ValueError),
        ([4, 4, 4.0], r"k_key\[2\] must be an int", TypeError),
        ("8", "or a list of one per layer", TypeError),
    ],
)
def test_a_bad_per_layer_budget_is_refused_by_name(k_key, error, kind) -> None:
    model = tiny_model("llama")
    dictionary = make_dictionary(model)
    assert len(dictionary.config.layer_indices) == 3
    with pytest.raises(kind, match=error):
        SparseSemanticCache(dictionary, k_key=k_key)


def test_the_eval_allocates_records_and_serves_a_per_layer_budget(tmp_path, monkeypatch) -> None:
    """`sta-cache eval --allocate-bits B --record-budgets`: the layer sensitivity is measured on the training split
    and saved (to the out folder and the dictionary), the row stores per-layer atoms within B bits, and once
    recorded, bits_per_element= serves exactly those atoms and stores the bits the eval measured. A second eval
    reads the saved sensitivity instead of measuring again."""
    from test_analyze_eval import CharTokenizer, _ids
    from test_budgets import TINY_EVAL

    import sta_cache.evaluation.run as eval_run

    model = tiny_model("llama")
    folder = tmp_path / "dictionary"
    make_dictionary(model, encoder="omp", n_atoms=64).save_pretrained(folder)
    monkeypatch.setattr(eval_run, "SENSITIVITY_TOKENS", 96)
    monkeypatch.setattr(eval_run, "SENSITIVITY_PREFILL", 32)
    common = dict(dictionary=str(folder), allocate_bits=[6.0, 2.0], budgets=[], **TINY_EVAL)
    texts = [_ids(80, seed=s)[0] for s in range(2)]
    first = run_eval(
        EvalConfig(out=str(tmp_path / "a"), record_budgets=True, **common),
        model=model,
        tokenizer=CharTokenizer(),
        dictionary=KVDictionary.from_pretrained(folder),
        texts=texts,
    )
    saved = json.loads((tmp_path / "a" / "sensitivity.json").read_text())
    dictionary = KVDictionary.from_pretrained(folder)
    sensitivity = dictionary.config.layer_sensitivity
    assert sensitivity == LayerSensitivity(**saved) and sensitivity.atoms == (4, 6, 8, 12, 16, 24)
    assert "train split" in sensitivity.measured_on
    row, too_small = first["rows"][1:]
    assert not too_small["available"] and "cannot hold even 4 atoms" in too_small["reason"]
    meta = dictionary.config
    vector_bytes = partial(atom_code_bytes, n_atoms=64, pack_indices=True, coefficient_dtype=torch.float8_e4m3fn)
    expected = allocate(sensitivity, vector_bytes, code_bytes_per_vector_pair(6.0, meta))
    assert (tuple(row["params"]["k_key"]), tuple(row["params"]["k_value"])) == expected
    assert row["name"].startswith("STA per layer") and "for 6 bits, fp8" in row["name"]
    assert row["bits_per_element"] <= 6.0
    (recorded,) = meta.measured_budgets
    assert (recorded.k_key, recorded.k_value) == expected
    cache = SparseSemanticCache(dictionary, bits_per_element=6.0)
    assert [(layer.k["key"], layer.k["value"]) for layer in cache.sparse_layers] == list(zip(*expected, strict=True))
    states = torch.randn(1, meta.num_kv_heads, 120, meta.head_dim)
    for i in range(meta.num_layers):
        cache.update(states, states.clone(), i)
    assert cache_bytes(cache)["bits_per_element"] == pytest.approx(recorded.bits_per_element, abs=1e-4)

    def measured_again(*args, **kwargs):
        raise AssertionError("the saved sensitivity should have been read")

    monkeypatch.setattr(eval_run, "measure_sensitivity", measured_again)
    folder_without = tmp_path / "plain"
    make_dictionary(model, encoder="omp", n_atoms=64).save_pretrained(folder_without)
    second = run_eval(
        EvalConfig(
            out=str(tmp_path / "b"),
            **{**common, "dictionary": str(folder_without)},
            sensitivity=str(tmp_path / "a" / "sensitivity.json"),
        ),
        model=model,
        tokenizer=CharTokenizer(),
        dictionary=KVDictionary.from_pretrained(folder_without),
        texts=texts,
    )
    assert second["rows"][1]["params"]["k_key"] == row["params"]["k_key"]


def test_the_command_line_takes_allocation_targets_and_a_sensitivity_file() -> None:
    """`--allocate-bits 2.3,3` alone evaluates exactly those per-layer rows (no default budgets beside them)."""
    from sta_cache.cli import _eval_options, build_parser

    argv = ["eval", "--dictionary", "d", "--out", "o", "--allocate-bits", "2.3,3", "--sensitivity", "s.json"]
    config = EvalConfig.preset(False, **_eval_options(build_parser().parse_args(argv)))
    assert config.allocate_bits == [2.3, 3.0] and config.sensitivity == "s.json" and config.budgets == []
    assert config.sensitivity_atoms == [4, 6, 8, 12, 16, 24]
    argv += ["--sensitivity-atoms", "16,32,64"]
    assert EvalConfig.preset(False, **_eval_options(build_parser().parse_args(argv))).sensitivity_atoms == [16, 32, 64]
    with pytest.raises(ValueError, match="target bits per element must be positive"):
        EvalConfig(allocate_bits=[-1])
