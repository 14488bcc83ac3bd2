"""`sta-cache analyze` / `sta-cache eval` on a tiny random Llama and a random dictionary (seconds each)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import DynamicCache, QuantizedCache

from conftest import VOCAB, make_dictionary, tiny_model
from sta_cache import SparseSemanticCache
from sta_cache.cli import build_parser
from sta_cache.evaluation import (
    AnalyzeConfig,
    EvalConfig,
    cache_bytes,
    depth_groups,
    elbow_chord,
    elbow_gain,
    feed,
    passkey_correct,
    passkey_prompt,
    run_analysis,
    run_eval,
    suggest_budget,
)
from sta_cache.evaluation.bytes import amortised_bits_per_element
from sta_cache.evaluation.figures import place_labels, pyplot
from sta_cache.evaluation.inputs import TextFileError, file_texts
from sta_cache.evaluation.passkey import PASSKEY_INTRO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class CharTokenizer:
    """Printable ASCII, one token per character (ids 0..94 < the tiny vocabulary)."""

    bos_token_id = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True, **kwargs):
        return {"input_ids": [min(max(ord(c) - 32, 0), VOCAB - 1) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(chr(int(i) + 32) for i in ids)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# ============================================================================================ elbow
KS = [1, 2, 4, 8, 16, 32, 64]


def test_elbow_chord_finds_the_knee_of_a_synthetic_curve():
    knee = [0.5, 0.7, 0.85, 0.95, 0.96, 0.97, 0.975]
    assert elbow_chord(KS, knee) == 8
    assert elbow_gain(KS, knee, threshold=0.02) == 8
    # 1 - exp(-k/1.5): scaled distances above the chord are .32, .53, .49, ... at k = 2, 4, 8 -> 4; affine-invariant.
    saturating = [1 - math.exp(-k / 1.5) for k in KS]
    assert elbow_chord(KS, saturating) == 4
    assert elbow_chord(KS, [3 * y - 1 for y in saturating]) == 4


def test_elbow_chord_edge_cases():
    # Degrading past k=16 (a truncated Top-K dictionary can): points after the best one are ignored.
    assert elbow_chord(KS, [0.5, 0.6, 0.7, 0.95, 0.96, 0.9, 0.8]) == 8
    # Linear in log2(k): no diminishing returns -> the best k.
    assert elbow_chord(KS, [0.1 * i for i in range(7)]) == 64
    # Best at the first point, or flat -> the first k.
    assert elbow_chord(KS, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]) == 1
    assert elbow_chord(KS, [0.5] * 7) == 1
    assert elbow_gain(KS, [0.1 * i for i in range(7)], threshold=0.05) == 64


def test_suggested_budget_and_depth_groups():
    layers = list(range(6))
    groups = depth_groups(layers)
    assert groups == {"shallow": [0, 1], "middle": [2, 3], "deep": [4, 5]}
    per_layer = {
        0: {"key": 4, "value": 8},
        1: {"key": 4, "value": 8},
        2: {"key": 8, "value": 16},
        3: {"key": 8, "value": 16},
        4: {"key": 8, "value": 32},
        5: {"key": 16, "value": 32},
    }
    budget = suggest_budget(per_layer, layers)
    assert (budget["k_key"], budget["k_value"]) == (8, 16)
    assert budget["by_group"]["shallow"] == {"k_key": 4, "k_value": 8}
    assert budget["by_group"]["deep"] == {"k_key": 16, "k_value": 32}
    assert budget["layers_differ"] and budget["per_layer"]["5"] == [16, 32]


# ============================================================================================ byte accounting
def _ids(n, seed=0):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _dense_layer_bytes(layer):
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


def test_bytes_of_dynamic_cache_equal_its_tensors(llama):
    cache = DynamicCache(config=llama.config)
    feed(llama, _ids(50), cache, prefill=20, chunk=8)
    counted = cache_bytes(cache)
    c = llama.config
    expected = c.num_hidden_layers * 2 * c.num_key_value_heads * 50 * 16 * 4
    assert counted["total"] == counted["dense"] == expected
    assert counted["tokens"] == 50 and counted["per_token"] == expected / 50
    assert counted["bits_per_element"] == 32 and counted["bytes_per_vector"] == 16 * 4
    assert counted["elements_per_token"] == c.num_hidden_layers * c.num_key_value_heads * 16 * 2


def test_bytes_of_sparse_cache_equal_its_stored_tensors(llama):
    dictionary = make_dictionary(llama, n_atoms=300)  # int16 indices
    cache = SparseSemanticCache(
        dictionary, k_key=3, k_value=5, residual_length=8, num_sink_tokens=2, config=llama.config
    )
    feed(llama, _ids(70), cache, prefill=24, chunk=8)
    counted = cache_bytes(cache)  # flushes: everything beyond the window is coded
    expected_codes = expected_dense = 0
    for layer in cache.layers:
        assert layer.num_window == 8 and layer.num_sinks == 2 and layer.num_compressed == 60
        for kind in ("key", "value"):
            indices, coefficients = layer.codes[kind]
            assert indices.dtype == torch.int16 and coefficients.dtype == torch.float32
            expected_codes += indices.numel() * 2 + coefficients.numel() * 4
        expected_dense += sum(
            t.numel() * t.element_size()
            for t in (
                layer.sink_keys,
                layer.sink_values,
                layer.keys,
                layer.values,
                layer.sink_positions,
                layer.sink_real,
                layer.window_positions,
                layer.window_real,
            )
        )
    heads, layers = llama.config.num_key_value_heads, llama.config.num_hidden_layers
    assert expected_codes == layers * heads * 60 * (3 + 5) * (2 + 4)
    assert counted["codes"] == expected_codes and counted["dense"] == expected_dense
    assert counted["total"] == expected_codes + expected_dense
    assert counted["per_token"] == counted["total"] / 70
    assert counted["marginal_per_token"] == expected_codes / 60
    elements = layers * heads * 60 * 16 * 2
    assert counted["bits_per_element"] == pytest.approx(8 * expected_codes / elements)  # 8 x 6 x 8 / 32 = 12
    assert counted["bits_per_element"] == pytest.approx(12.0)
    footprint = cache.memory_footprint()
    assert footprint["code_bytes"] + footprint["dense_bytes"] == counted["total"]
    # one float32 decoder shared by the KV heads: the layers read it in place, with the rotary frequencies
    held = sum(
        t.numel() * t.element_size()
        for i in dictionary.config.layer_indices
        for t in (*dictionary[i].parameters(), dictionary[i].rope_inv_freq)
    )
    assert counted["dictionary"] == footprint["dictionary_bytes"] == held
    per_token = layers * heads * 16 * 2
    assert amortised_bits_per_element(counted, 1000) == pytest.approx(12.0 + 8 * held / (1000 * per_token))


def test_bytes_of_fp8_quantized_cache_equal_its_tensors(llama):
    cache = QuantizedCache(backend="fp8", config=llama.config)
    feed(llama, _ids(40), cache, prefill=16, chunk=8)
    counted = cache_bytes(cache)
    per_layer = 2 * (2 * 40 * 16 * 1 + 4)  # keys and values: 1 byte per element + a float32 scale each
    assert counted["quantized"] == llama.config.num_hidden_layers * per_layer
    assert counted["residual"] == 0 and counted["tokens"] == 40
    assert counted["bits_per_element"] == pytest.approx(8 * per_layer / (2 * 40 * 16 * 2))  # 8 + the scales


def test_bytes_of_quanto_cache_count_packed_data_scales_and_residual(llama):
    pytest.importorskip("optimum.quanto")
    cache = QuantizedCache(backend="quanto", nbits=4, q_group_size=16, residual_length=8, config=llama.config)
    feed(llama, _ids(37), cache, prefill=20, chunk=8)
    counted = cache_bytes(cache)
    quantized = residual = 0
    for layer in cache.layers:
        n_quantized = layer._quantized_keys.shape[-2]
        elements = 2 * n_quantized * 16  # heads x tokens x head_dim
        groups = elements // 16
        # 4-bit data packed two per uint8 byte, plus a float32 scale and a float32 shift per group
        quantized += 2 * (elements // 2 + groups * 4 * 2)
        residual += _dense_layer_bytes(layer) if layer.keys.dim() == 4 else 0
    assert counted["quantized"] == quantized and counted["residual"] == residual
    assert counted["total"] == quantized + residual
    assert counted["bits_per_element"] == pytest.approx(4 + 2 * 32 / 16)  # + a float32 scale and shift per 16


# ============================================================================================ passkey
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_prompt_puts_the_key_at_the_requested_depth(depth):
    tokenizer = CharTokenizer()
    prompt = passkey_prompt(tokenizer, 1500, depth, "48213")
    ids = prompt.input_ids.tolist()
    unit = len(
        tokenizer(" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.")[
            "input_ids"
        ]
    )
    assert 1500 - unit < len(ids) <= 1500
    needle = tokenizer.decode(ids[prompt.key_position : prompt.key_position + prompt.needle_length])
    assert needle.startswith(" The pass key is 48213.") and needle.count("48213") == 2
    text = tokenizer.decode(ids)
    assert text.count("48213") == 2 and text.endswith("What is the pass key? The pass key is")
    intro = len(tokenizer(PASSKEY_INTRO)["input_ids"])
    filler = (
        len(ids) - intro - prompt.needle_length - len(tokenizer(" What is the pass key? The pass key is")["input_ids"])
    )
    measured = (prompt.key_position - intro) / filler
    assert abs(measured - depth) <= unit / filler + 1e-9
    assert measured == pytest.approx(prompt.actual_depth)


def test_passkey_prompt_errors_and_answer_check():
    with pytest.raises(ValueError):
        passkey_prompt(CharTokenizer(), 100, 0.5, "12345")
    with pytest.raises(ValueError):
        passkey_prompt(CharTokenizer(), 1000, 1.5, "12345")
    assert passkey_correct(" 12345. Remember", "12345")
    assert passkey_correct(" 1 2 3 4 5", "12345")
    assert not passkey_correct(" 123456", "12345")
    assert not passkey_correct(" 54321 12345", "12345")
    assert not passkey_correct(" nothing", "12345")


# ============================================================================================ reports
def test_eval_writes_a_well_formed_report(llama, tmp_path):
    dictionary = make_dictionary(llama)
    texts = [_ids(96, seed=s)[0] for s in range(2)]
    config = EvalConfig(
        out=str(tmp_path),
        prefill=32,
        chunk=16,
        residual_length=16,
        num_sink_tokens=2,
        budgets=[(2, 4)],
        coefficient_dtypes=[None, "float8_e4m3fn"],
        paths=["sta", "sdpa"],
        baselines=["rotated:2.5", "kivi:2:8", "fp8", "nosuch:4"],
        rotation_seeds=[0, 1],
        max_context=400,
        passkey_lengths=[400],
        passkey_depths=[0.5],
        passkey_trials=1,
        passkey_new_tokens=3,
        progress=False,
    )
    results = run_eval(config, model=llama, tokenizer=CharTokenizer(), dictionary=dictionary, texts=texts)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    names = [row["name"] for row in on_disk["rows"]]
    assert names == [
        "DynamicCache",
        "STA 2/4 (sta)",
        "STA 2/4 (sdpa)",
        "STA 2/4, fp8 (sta)",
        "STA 2/4, fp8 (sdpa)",
        "Rotated 2.5-bit",
        "KIVI-2 g8",
        "QuantizedCache fp8",
        "QuantizedCache nosuch int4",
    ]
    rows = {row["name"]: row for row in results["rows"]}
    assert not rows["QuantizedCache nosuch int4"]["available"]
    assert "Unknown quantization backend" in rows["QuantizedCache nosuch int4"]["reason"]
    dense = rows["DynamicCache"]
    assert dense["ppl_ratio"] == 1.0 and dense["scored_tokens"] == 2 * (96 - 32)
    assert dense["bytes"]["per_token"] == 3 * 2 * 2 * 16 * 4  # layers x K/V x heads x head_dim x float32
    for row in on_disk["rows"][:-1]:  # the schema the README documents
        assert {"name", "bits_per_element", "ppl_ratio", "ppl_ratio_per_text"} <= set(row)
    assert dense["bits_per_element"] == 32 and rows["QuantizedCache fp8"]["bits_per_element"] == pytest.approx(8, 0.01)
    # rotated: 8 channels x 3 bits + 8 x 2 bits + a float16 norm per 16-dim vector; KIVI: 2 bits + 2 x 16 / 8
    assert rows["Rotated 2.5-bit"]["bits_per_element"] == pytest.approx(2.5 + 16 / 16)
    assert rows["KIVI-2 g8"]["bits_per_element"] == pytest.approx(2 + 32 / 8)
    rotated = rows["Rotated 2.5-bit"]
    assert rotated["seeds"] == [0, 1] and [s["seed"] for s in rotated["per_seed"]] == [0, 1]
    assert rotated["perplexity"] == pytest.approx(sum(s["perplexity"] for s in rotated["per_seed"]) / 2)
    assert rotated["ppl_ratio"] == pytest.approx(sum(s["ppl_ratio"] for s in rotated["per_seed"]) / 2)
    assert rotated["ppl_ratio_per_text"] == pytest.approx(
        [sum(values) / 2 for values in zip(*(s["ppl_ratio_per_text"] for s in rotated["per_seed"]), strict=True)]
    )
    assert rotated["per_seed"][0]["perplexity"] != rotated["per_seed"][1]["perplexity"]  # other rotations
    assert len(rotated["passkey"]["trials"]) == 2  # one per seed
    amortised = rows["STA 2/4, fp8 (sta)"]["bytes"]["amortised_bits_per_element"]
    assert set(amortised) == {"2048", "32768"} and amortised["2048"] > amortised["32768"] > 2.75
    assert dense["bytes"]["amortised_bits_per_element"]["2048"] == 32
    for name in ("STA 2/4 (sta)", "STA 2/4 (sdpa)", "Rotated 2.5-bit", "KIVI-2 g8", "QuantizedCache fp8"):
        row = rows[name]
        assert row["available"] and row["bytes"]["per_token"] < dense["bytes"]["per_token"]
        assert math.isfinite(row["perplexity"]) and 0 <= row["accuracy"] <= 1
        assert len(row["passkey"]["trials"]) == len(row.get("seeds") or [None])
        assert row["passkey"]["accuracy"] in (0.0, 0.5, 1.0)
        per_text = row["per_text_perplexity"]
        assert len(per_text) == 2 and min(per_text) <= row["perplexity"] <= max(per_text)
        assert row["ppl_ratio_per_text"] == pytest.approx(
            [p / d for p, d in zip(per_text, dense["per_text_perplexity"], strict=True)]
        )
    fp32, fp8 = rows["STA 2/4 (sta)"], rows["STA 2/4, fp8 (sta)"]
    assert fp8["params"]["coefficient_dtype"] == "float8_e4m3fn" and fp32["params"]["coefficient_dtype"] == "float32"
    assert fp8["bytes"]["codes"] < fp32["bytes"]["codes"]
    # the two attention paths read the same codes
    assert rows["STA 2/4 (sta)"]["perplexity"] == pytest.approx(rows["STA 2/4 (sdpa)"]["perplexity"], rel=1e-3)
    report = (tmp_path / "report.md").read_text()
    table = [
        line
        for line in report.splitlines()
        if line.startswith("| ") and "bytes/token" not in line and not line.startswith("| ---")
    ]
    assert any(line.startswith("| QuantizedCache nosuch int4 |") and "unavailable" in line for line in table)
    per_text_rows = report.split("## Per text")[1].split("STA dictionaries")[0]
    for name in ("DynamicCache", "STA 2/4, fp8 (sta)", "QuantizedCache fp8", "Rotated 2.5-bit seed 1"):
        assert f"| {name} | " in per_text_rows
    assert "* QuantizedCache fp8 (8.01 bits/element): " in per_text_rows
    assert "* STA 2/4, fp8 (sta) (2.75 bits/element): " in per_text_rows
    header = next(line for line in report.splitlines() if line.startswith("| cache | attention"))
    for line in table[: len(names)]:
        assert line.count("|") == header.count("|")
    assert "window 16 + 2 sinks" in report and "](pareto.png)" in report and "](pareto_amortised.png)" in report
    assert "| Rotated 2.5-bit | sdpa | Haar rotation per layer and kind" in report
    for name in ("pareto.png", "pareto_amortised.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_eval_reads_the_users_texts(llama, tmp_path):
    files = []
    for n, length in enumerate((120, 200)):
        path = tmp_path / f"text{n}.txt"
        generator = torch.Generator().manual_seed(n)
        path.write_text("".join(chr(97 + int(i)) for i in torch.randint(26, (length,), generator=generator)))
        files.append(str(path))
    config = EvalConfig(
        out=str(tmp_path / "out"),
        texts=files,
        context=160,
        prefill=32,
        chunk=16,
        residual_length=16,
        num_sink_tokens=2,
        budgets=[(2, 4)],
        paths=["sta"],
        baselines=[],
        passkey_trials=0,
        progress=False,
    )
    results = run_eval(config, model=llama, tokenizer=CharTokenizer(), dictionary=make_dictionary(llama))
    assert results["texts"]["source"] == files and results["texts"]["tokens"] == [120, 160]  # cut to --context
    dense = results["rows"][0]
    assert dense["scored_tokens"] == (120 - 32) + (160 - 32) and len(dense["ppl_ratio_per_text"]) == 2
    assert "2 user texts (`" in (tmp_path / "out" / "report.md").read_text()


def test_text_files_that_cannot_be_evaluated_are_refused_clearly(tmp_path):
    tokenizer = CharTokenizer()
    with pytest.raises(TextFileError, match=r"--text .*missing.txt: no such file"):
        file_texts(tokenizer, [str(tmp_path / "missing.txt")], 100, 10)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(TextFileError, match="not UTF-8 text"):
        file_texts(tokenizer, [str(latin)], 100, 10)
    short = tmp_path / "short.txt"
    short.write_text("twenty characters...")
    with pytest.raises(TextFileError, match="20 tokens, but the first 32 are the prefill"):
        file_texts(tokenizer, [str(short)], 100, 32)
    args = build_parser().parse_args(["eval", "--dictionary", "d", "--out", "o", "--text", "a", "--text", "b"])
    assert args.texts == ["a", "b"]


def test_pareto_labels_never_overlap(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    generator = torch.Generator().manual_seed(0)
    xs = torch.rand(16, generator=generator) * 2 + 2  # 16 points crowded between 2 and 4
    ys = 1 + torch.rand(16, generator=generator) * 0.02
    ax.set_xlim(1.5, 5)
    ax.set_ylim(0.99, 1.03)
    ax.scatter(xs, ys)
    fig.tight_layout()
    boxes = place_labels(
        ax, [(float(x), float(y), f"configuration {n}") for n, (x, y) in enumerate(zip(xs, ys, strict=True))]
    )
    assert len(boxes) == 16
    for i, first in enumerate(boxes):
        for second in boxes[i + 1 :]:
            assert not first.overlaps(second)
    fig.savefig(tmp_path / "labels.png")
    plt.close(fig)


def test_analyze_writes_a_well_formed_report(llama, tmp_path):
    dictionary = make_dictionary(llama)  # N = 64 atoms of d = 16
    text = tmp_path / "eval.txt"
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "green", "seven"]
    generator = torch.Generator().manual_seed(0)
    text.write_text(
        "\n".join(" ".join(words[int(i)] for i in torch.randint(10, (12,), generator=generator)) for _ in range(80))
        + "\n"
    )
    out = tmp_path / "out"
    config = AnalyzeConfig(
        out=str(out),
        ks=[1, 2, 4, 8, 16, 128],
        context=64,
        windows=4,
        skip_first=2,
        top_atoms=3,
        examples=2,
        progress=False,
    )
    results = run_analysis(config, model=llama, tokenizer=CharTokenizer(), dictionary=dictionary, text_path=text)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["ks"] == [1, 2, 4, 8, 16]  # k beyond N dropped
    assert set(on_disk["layers"]) == {"0", "1", "2"}
    for layer in on_disk["layers"].values():
        for kind in ("key", "value"):
            assert len(layer[kind]["cos"]) == len(layer[kind]["fvu"]) == 5
            assert layer[kind]["vectors"] == 4 * 62 * 2  # windows x kept positions x KV heads
            assert layer["elbow"][kind]["chord"] in on_disk["ks"]
    budget = results["suggested_budget"]
    assert budget["k_key"] in on_disk["ks"] and budget["k_value"] in on_disk["ks"]
    atoms = on_disk["atoms"]
    assert atoms["layer"] == 1
    for kind in ("key", "value"):
        usage = atoms[kind]["usage"]
        assert 0 <= usage["dead"] < 64 and 0 < usage["entropy_normalized"] <= 1
        top = atoms[kind]["top_atoms"]
        assert len(top) == 3 and top[0]["uses"] >= top[1]["uses"] >= top[2]["uses"]
        assert all(re.search(r"\[.+\]$", e["context"]) for atom in top for e in atom["strongest"])
    assert set(on_disk["asymmetry"]["groups"]) == {"shallow", "middle", "deep"}
    report = (out / "report.md").read_text()
    for name in ("elbow.png", "asymmetry.png", "atoms_layer1.png"):
        assert f"]({name})" in report
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert f"k_key = {budget['k_key']}, k_value = {budget['k_value']}" in report
    elbow_rows = [line for line in report.splitlines() if re.match(r"\| \d+ \| (shallow|middle|deep) \|", line)]
    assert len(elbow_rows) == 6 and all(line.count("|") == 3 + 5 + 2 + 1 for line in elbow_rows)


def test_passkey_feed_modes_agree_on_a_dense_cache(llama):
    from sta_cache.evaluation import greedy_answer

    prompt = passkey_prompt(CharTokenizer(), 420, 0.5, "12345").input_ids
    generated = greedy_answer(llama, prompt, DynamicCache(config=llama.config), 4, "generate")
    chunked = greedy_answer(llama, prompt, DynamicCache(config=llama.config), 4, "chunked", prefill=64, chunk=16)
    assert len(generated) == 4 and generated == chunked


def test_analyze_train_per_k_on_a_tiny_model(llama, tmp_path):
    dictionary = make_dictionary(llama)
    text = tmp_path / "text.txt"
    generator = torch.Generator().manual_seed(1)
    text.write_text(
        "\n".join("".join(chr(97 + int(i)) for i in torch.randint(26, (60,), generator=generator)) for _ in range(60))
        + "\n"
    )
    out = tmp_path / "out"
    config = AnalyzeConfig(
        out=str(out),
        ks=[1, 2, 4],
        context=64,
        windows=2,
        skip_first=2,
        top_atoms=2,
        train_per_k=True,
        train_tokens=512,
        train_epochs=1.0,
        train_text=str(text),
        progress=False,
    )
    results = run_analysis(config, model=llama, tokenizer=CharTokenizer(), dictionary=dictionary, text_path=text)
    per_k = results["per_k"]
    assert per_k["ks"] == [1, 2, 4] and set(per_k["layers"]) == {"0", "1", "2"}
    assert all(len(per_k["layers"]["1"][kind]["cos"]) == 3 for kind in ("key", "value"))
    assert (out / "per_k" / "k2" / "dictionary.safetensors").is_file()
    assert (out / "per_k.png").read_bytes()[:8] == PNG_MAGIC and "](per_k.png)" in (out / "report.md").read_text()


@pytest.mark.parametrize("value_pursuit", ["mp", "omp"])
def test_eval_builds_its_caches_with_the_requested_value_pursuit(llama, value_pursuit):
    from sta_cache.evaluation.specs import cache_specs

    dictionary = make_dictionary(llama, encoder="omp")
    config = EvalConfig(out="unused", budgets=[(2, 4)], paths=["sta"], baselines=[], value_pursuit=value_pursuit)
    (spec,) = [spec for spec in cache_specs(llama, dictionary, config) if spec.family == "sta"]
    assert spec.params["value_pursuit"] == value_pursuit
    assert {layer.pursuit["value"] for layer in spec.make().sparse_layers} == {value_pursuit}


def test_eval_refuses_an_unknown_value_pursuit():
    with pytest.raises(ValueError, match="value_pursuit must be one of"):
        EvalConfig(out="unused", value_pursuit="greedy")
