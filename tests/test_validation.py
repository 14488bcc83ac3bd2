"""Inputs that used to be accepted and went wrong later (mid-generation, inside a kernel, or silently) are refused
where they are given: one table of bad inputs, each with the exception type and the words its message must
hold; then the inputs that are accepted and must give correct results."""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from conftest import COMMON, VOCAB, make_dictionary, tiny_model
from sta_cache import (
    DictionaryFormatError,
    KVDictionary,
    KVDictionaryConfig,
    SparseSemanticCache,
    UnsupportedModelError,
)
from sta_cache.cache import rotary_from_config
from sta_cache.collect import rotary_for_layer
from sta_cache.compat import cache_kwargs
from sta_cache.dictionary import CONFIG_NAME, DIGEST_KEY, WEIGHTS_NAME, tensor_digest
from sta_cache.hub import packaged_repo_ids, resolve_dictionary


# ------------------------------------------------------------------------------------------------- helpers
def cache(**kwargs) -> SparseSemanticCache:
    """A cache on the tiny llama's dictionary (N = 64 atoms) with ``kwargs``."""
    return SparseSemanticCache(make_dictionary(tiny_model("llama")), **kwargs)


def first_forward(dictionary: KVDictionary, arch: str = "llama") -> None:
    """Build a cache without ``config=`` and run the model's first forward through it."""
    model = tiny_model(arch)
    model(torch.randint(1, VOCAB, (1, 5)), **cache_kwargs(model, SparseSemanticCache(dictionary)))


def edited(dictionary: KVDictionary, edit: Callable[[KVDictionary], None]) -> KVDictionary:
    with torch.no_grad():
        edit(dictionary)
    return dictionary


def pre_rope() -> KVDictionary:
    return make_dictionary(tiny_model("llama"), key_space="pre_rope")


def with_config(dictionary: KVDictionary) -> SparseSemanticCache:
    return SparseSemanticCache(dictionary, config=tiny_model("llama").config)


def saved(tmp_path: Path, dictionary: KVDictionary | None = None) -> Path:
    """A pre-RoPE tiny-llama dictionary (or ``dictionary``) saved with save_pretrained (so with its digest)."""
    folder = tmp_path / "dictionary"
    (dictionary or pre_rope()).save_pretrained(folder)
    return folder


def with_fields(folder: Path, **fields) -> Path:
    """``folder`` with config.json fields replaced, as if edited by hand."""
    path = folder / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return folder


def with_config_text(folder: Path, text: str) -> Path:
    (folder / CONFIG_NAME).write_text(text)
    return folder


def with_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """``folder`` with its tensors edited and the digest recorded for the edited ones: the content checks, not the
    digest, must catch what is wrong."""
    tensors = load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)
    return with_fields(folder, **{DIGEST_KEY: tensor_digest(tensors)})


def with_bit_flipped(folder: Path) -> Path:
    """Flip the lowest bit of the first tensor's first byte: a float32 that moves by one ulp, finite and harmless
    to every other check."""
    path = folder / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[8 + int.from_bytes(data[:8], "little")] ^= 1
    path.write_bytes(bytes(data))
    return folder


def load(folder: Path) -> KVDictionary:
    return KVDictionary.load_folder(folder)


ATOM = "layers.1.key.0.W_dec"


def scaled_atom(scale: float) -> Callable[[dict], None]:
    return lambda tensors: tensors[ATOM][3].mul_(scale)


def huge_dictionary() -> KVDictionary:
    """One layer of 2**16 + 1 atoms of dimension 2: 17-bit indices, just beyond what packing holds."""
    config = KVDictionaryConfig(
        base_model="huge", num_layers=1, layer_indices=[0], num_kv_heads=1, head_dim=2, n_atoms=2**16 + 1, encoder="omp"
    )
    return KVDictionary(config)


def without_triton_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def without_triton_package(monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))


# ---------------------------------------------------------------------------------------------- the table
class Case(NamedTuple):
    id: str
    build: Callable[[Path, pytest.MonkeyPatch], object]  # (tmp_path, monkeypatch) -> does the bad thing
    error: type[Exception]
    words: tuple[str, ...]  # each must appear in the message


BACKENDS = "'auto', 'torch', 'triton', 'cpu'"
DTYPES = "torch.float32, torch.float16, torch.bfloat16"
K_RANGE = "must be an int from 1 to 64 (the dictionary's N atoms)"

# One case a row, as a table: formatted, each case would take four to eight lines and the table three times as many.
# fmt: off
CASES = [
    # --- arguments of SparseSemanticCache
    Case("k_key float", lambda t, m: cache(k_key=8.5), TypeError, ("k_key " + K_RANGE, "8.5 (float)")),
    Case("k_key string", lambda t, m: cache(k_key="8"), TypeError, ("k_key " + K_RANGE, "'8' (str)")),
    Case("k_key bool", lambda t, m: cache(k_key=True), TypeError, ("k_key " + K_RANGE, "True (bool)")),
    Case("k_key above N", lambda t, m: cache(k_key=65), ValueError, ("k_key " + K_RANGE, "got 65")),
    Case("k_value zero", lambda t, m: cache(k_value=0), ValueError, ("k_value " + K_RANGE, "got 0")),
    Case("residual_length float", lambda t, m: cache(residual_length=2.5), TypeError,
         ("residual_length must be an int >= 0", "2.5 (float)")),
    Case("residual_length negative", lambda t, m: cache(residual_length=-1), ValueError,
         ("residual_length must be an int >= 0", "got -1")),
    Case("num_sink_tokens None", lambda t, m: cache(num_sink_tokens=None), TypeError,
         ("num_sink_tokens must be an int >= 0", "None")),
    Case("encode_batch zero", lambda t, m: cache(encode_batch=0), ValueError, ("encode_batch must be an int >= 1",)),
    Case("pack_indices string", lambda t, m: cache(pack_indices="yes"), TypeError,
         ("pack_indices must be True or False", "'yes'")),
    Case("pack_indices beyond 16 bits", lambda t, m: SparseSemanticCache(huge_dictionary(), pack_indices=True),
         ValueError, ("at most 16 bits", "N=65537", "use pack_indices=False")),
    Case("backend cuda", lambda t, m: cache(backend="cuda"), ValueError,
         (f"backend must be one of {BACKENDS}", "got 'cuda'", "follows the model's device")),
    Case("backend gpu", lambda t, m: cache(backend="gpu"), ValueError, (f"backend must be one of {BACKENDS}",)),
    Case("backend CPU", lambda t, m: cache(backend="CPU"), ValueError,
         (f"backend must be one of {BACKENDS}", "did you mean 'cpu'?")),
    Case("backend None", lambda t, m: cache(backend=None), TypeError, (f"backend must be one of {BACKENDS}",)),
    Case("backend triton without CUDA", lambda t, m: (without_triton_device(m), cache(backend="triton")),
         ValueError, ("backend='triton' needs a CUDA GPU", "backend='auto'", "TRITON_INTERPRET=1")),
    Case("backend triton without triton", lambda t, m: (without_triton_package(m), cache(backend="triton")),
         ValueError, ("needs the triton package", "pip install triton")),
    Case("coefficient_dtype int8", lambda t, m: cache(coefficient_dtype=torch.int8), ValueError,
         ("coefficient_dtype torch.int8 cannot hold signed real coefficients", DTYPES, "None for the model's")),
    Case("coefficient_dtype int32", lambda t, m: cache(coefficient_dtype=torch.int32), ValueError,
         ("torch.int32 cannot hold", DTYPES)),
    Case("coefficient_dtype uint8", lambda t, m: cache(coefficient_dtype=torch.uint8), ValueError,
         ("torch.uint8 cannot hold", DTYPES)),
    Case("coefficient_dtype bool", lambda t, m: cache(coefficient_dtype=torch.bool), ValueError,
         ("torch.bool cannot hold", DTYPES)),
    Case("coefficient_dtype complex", lambda t, m: cache(coefficient_dtype=torch.complex64), ValueError,
         ("torch.complex64 cannot hold", DTYPES)),
    Case("coefficient_dtype string", lambda t, m: cache(coefficient_dtype="float16"), TypeError,
         ("coefficient_dtype must be a torch.dtype", "the string 'float16'", "pass torch.float16")),
    Case("coefficient_bits with coefficient_dtype",
         lambda t, m: cache(coefficient_bits=4, coefficient_dtype=torch.float8_e4m3fn), ValueError,
         ("coefficient_bits=4 stores coefficients as levels", "coefficient_dtype=torch.float8_e4m3fn as floats",
          "pass one of them")),
    Case("coefficient_bits 1", lambda t, m: cache(coefficient_bits=1), ValueError, ("coefficient_bits must be",)),
    Case("coefficient_bits 9", lambda t, m: cache(coefficient_bits=9), ValueError, ("coefficient_bits must be",)),
    Case("coefficient_bits string", lambda t, m: cache(coefficient_bits="4"), TypeError,
         ("coefficient_bits must be",)),
    Case("value_bits with k_value", lambda t, m: cache(value_bits=3, k_value=8), ValueError,
         ("value_bits=3 stores every coordinate of a rotated value", "k_value=8 atoms per value",
          "pass one of them")),
    Case("value_bits 1", lambda t, m: cache(value_bits=1), ValueError, ("value_bits must be an int from 2 to 8",)),
    Case("value_bits 2.5", lambda t, m: cache(value_bits=2.5), TypeError, ("value_bits must be an int",)),
    Case("value_bits with bits_per_element", lambda t, m: cache(value_bits=3, bits_per_element=3), ValueError,
         ("do not also pass value_bits",)),
    Case("dictionary given by name", lambda t, m: SparseSemanticCache("sta-cache/SmolLM2-135M-Instruct"), TypeError,
         ("dictionary must be a KVDictionary, got str", "SparseSemanticCache.from_pretrained")),
    Case("config a dict", lambda t, m: cache(config={"num_hidden_layers": 3}), TypeError,
         ("config must be a transformers PretrainedConfig (model.config), got dict",)),
    Case("config and model", lambda t, m: cache(config=tiny_model("llama").config, model=tiny_model("llama")),
         TypeError, ("pass config= or model=, not both",)),
    # --- a dictionary for another model, without config=: refused at the first forward
    Case("KV heads without config", lambda t, m: first_forward(edited(
        make_dictionary(tiny_model("llama")), lambda d: setattr(d.config, "num_kv_heads", 1))),
         UnsupportedModelError, ("layer 0 of the model has 2 KV heads and head_dim 16", "made for 1 KV heads",
                                 "pass config=model.config")),
    Case("head_dim without config", lambda t, m: first_forward(make_dictionary(tiny_model("gemma3"))),
         UnsupportedModelError, ("2 KV heads and head_dim 16", "1 KV heads and head_dim 32")),
    Case("more model layers without config", lambda t, m: first_forward(edited(
        make_dictionary(tiny_model("llama")), lambda d: setattr(d.config, "num_layers", 2))),
         UnsupportedModelError, ("the model has a layer 2", "covers 2 layers", "pass config=model.config")),
    # --- pre-RoPE frequencies against the model's (config=)
    Case("rope zero frequencies", lambda t, m: with_config(edited(pre_rope(), lambda d: d[1].rope_inv_freq.zero_())),
         UnsupportedModelError, ("rotates keys with other frequencies", "layer 1 has inv_freq [1, 0.3162, 0.1, ...]",
                                 "the dictionary [0, 0, 0, ...]")),
    Case("rope doubled frequencies", lambda t, m: with_config(edited(pre_rope(), lambda d: d[2].rope_inv_freq.mul_(2))),
         UnsupportedModelError, ("layer 2 has inv_freq [1, 0.3162", "the dictionary [2, 0.6325",
                                 "another rope_theta, rope scaling or model")),
    Case("rope_scaling not the model's", lambda t, m: with_config(edited(
        pre_rope(), lambda d: setattr(d.config, "rope_scaling", 2.0))),
         UnsupportedModelError, ("has rope_scaling 2.0", "scales its rotary embedding by 1.0")),
    # --- dictionary files: config.json fields
    Case("rope_scaling NaN", lambda t, m: load(with_fields(saved(t), rope_scaling=float("nan"))),
         DictionaryFormatError, ("config.json", "rope_scaling must be a finite positive number, got nan")),
    Case("rope_scaling zero", lambda t, m: load(with_fields(saved(t), rope_scaling=0)), DictionaryFormatError,
         ("rope_scaling must be a finite positive number, got 0",)),
    Case("rope_scaling inf", lambda t, m: load(with_fields(saved(t), rope_scaling=float("inf"))),
         DictionaryFormatError, ("rope_scaling must be a finite positive number, got inf",)),
    Case("rope_scaling negative", lambda t, m: load(with_fields(saved(t), rope_scaling=-1.0)), DictionaryFormatError,
         ("rope_scaling must be a finite positive number, got -1.0",)),
    Case("rope_scaling string", lambda t, m: load(with_fields(saved(t), rope_scaling="1.0")), DictionaryFormatError,
         ("rope_scaling must be a finite positive number, got '1.0' (str)",)),
    Case("n_atoms float", lambda t, m: load(with_fields(saved(t), n_atoms=64.0)), DictionaryFormatError,
         ("n_atoms must be an int >= 1, got 64.0 (float)",)),
    Case("num_layers bool", lambda t, m: load(with_fields(saved(t), num_layers=True)), DictionaryFormatError,
         ("num_layers must be an int >= 1, got True (bool)",)),
    Case("layer_indices strings", lambda t, m: load(with_fields(saved(t), layer_indices=[0, "1"])),
         DictionaryFormatError, ("each of layer_indices must be an int from 0 to 2", "'1' (str)")),
    Case("layer_indices twice", lambda t, m: load(with_fields(saved(t), layer_indices=[0, 0, 1])),
         DictionaryFormatError, ("name a layer twice",)),
    Case("per_head string", lambda t, m: load(with_fields(saved(t), per_head="no")), DictionaryFormatError,
         ("per_head must be True or False, got 'no'",)),
    Case("key_space unknown", lambda t, m: load(with_fields(saved(t), key_space="rope")), DictionaryFormatError,
         ("key_space must be one of 'pre_rope', 'post_rope', got 'rope'",)),
    Case("config not an object", lambda t, m: load(with_config_text(saved(t), "[1]")), DictionaryFormatError,
         ("is not valid dictionary JSON: it holds no object",)),
    # --- dictionary files: tensors
    Case("zero atom", lambda t, m: load(with_tensors(saved(t), scaled_atom(0.0))), DictionaryFormatError,
         (f"tensor {ATOM}: atom 3 has norm 0,", "decoder atoms are unit vectors")),
    Case("tiny atom", lambda t, m: load(with_tensors(saved(t), scaled_atom(1e-30))), DictionaryFormatError,
         (f"tensor {ATOM}: atom 3 has norm 1e-30",)),
    Case("huge atom", lambda t, m: load(with_tensors(saved(t), scaled_atom(1e30))), DictionaryFormatError,
         (f"tensor {ATOM}: atom 3 has norm 1e+30",)),
    Case("bool atoms", lambda t, m: load(with_tensors(saved(t), lambda ts: ts.update({ATOM: ts[ATOM] > 0}))),
         DictionaryFormatError, (f"tensor {ATOM} has dtype torch.bool; dictionary tensors are floats",)),
    Case("rope frequencies zero in the file", lambda t, m: load(with_tensors(
        saved(t), lambda ts: ts["layers.0.rope_inv_freq"].zero_())),
         DictionaryFormatError, ("layers.0.rope_inv_freq holds rotary frequencies <= 0",)),
    Case("bit flip", lambda t, m: load(with_bit_flipped(saved(t))), DictionaryFormatError,
         ("do not match the sha256 that config.json records", "download or save it again")),
    # --- names
    Case("Hub id of 300 characters", lambda t, m: SparseSemanticCache.from_pretrained("a" * 300),
         DictionaryFormatError, ("(300 characters) is neither a local folder (File name too long)",
                                 "nor a valid Hub repo id ('name' or 'org/name'", "at most 96 characters")),
    Case("Hub id with spaces", lambda t, m: KVDictionary.from_pretrained("my org/my dictionary"),
         DictionaryFormatError, ("'my org/my dictionary' is neither a local folder (no such folder)",)),
    Case("name not a string", lambda t, m: KVDictionary.from_pretrained(3), TypeError,
         ("a dictionary is named by a folder path or a Hub repo id, got 3",)),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_with_a_clear_error(case: Case, tmp_path, monkeypatch):
    with pytest.raises(case.error) as raised:
        case.build(tmp_path, monkeypatch)
    message = str(raised.value)
    for words in case.words:
        assert words in message, f"{words!r} not in {message!r}"


# ------------------------------------------------------------------------------- accepted and correct
def test_narrow_coefficients_are_clamped_to_their_range_with_one_warning_per_layer():
    """float16 codes of keys 1e6 long would be inf: they are clamped to float16's maximum, with one warning per
    layer however many encodes clamp."""
    model = tiny_model("llama")
    sparse = SparseSemanticCache(
        make_dictionary(model),
        residual_length=1,
        num_sink_tokens=0,
        encode_batch=1,
        coefficient_dtype=torch.float16,
        backend="torch",
    )
    layer = sparse.layers[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            layer.update(*(1e6 * torch.randn(2, 1, 2, 3, 16)).unbind(0))
    assert [str(w.message).split(" (")[0] for w in caught] == [
        "layer 0: coefficients beyond the range of torch.float16"
    ]
    for kind in ("key", "value"):
        coefficients = layer.codes[kind][1]
        assert torch.isfinite(coefficients).all() and coefficients.abs().max() == torch.finfo(torch.float16).max


def test_packing_holds_up_to_16_bit_indices():
    config = KVDictionaryConfig(
        base_model="edge", num_layers=1, layer_indices=[0], num_kv_heads=1, head_dim=2, n_atoms=2**16, encoder="omp"
    )
    assert SparseSemanticCache(KVDictionary(config), pack_indices=True).sparse_layers[0].pack_indices


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16])
def test_narrow_float_files_load(tmp_path, dtype):
    """A dictionary saved in float8 or bfloat16 loads (read through float32), atoms unit to the dtype's precision."""
    dictionary = pre_rope()
    folder = dictionary.save_pretrained(tmp_path / "narrow", dtype=dtype)
    loaded = KVDictionary.load_folder(folder)
    atoms, original = loaded[1].key[0].W_dec, dictionary[1].key[0].W_dec
    assert torch.allclose(atoms, original, atol=0.15 if dtype.itemsize == 1 else 0.01)
    assert torch.equal(loaded[1].rope_inv_freq, dictionary[1].rope_inv_freq)


def test_saved_dictionaries_record_their_digest_and_old_ones_without_it_load(tmp_path):
    folder = saved(tmp_path)
    recorded = json.loads((folder / CONFIG_NAME).read_text())[DIGEST_KEY]
    assert recorded == tensor_digest(load_file(folder / WEIGHTS_NAME)) and len(recorded) == 64
    with_fields(folder, **{DIGEST_KEY: None})
    load(with_bit_flipped(folder))  # without a digest only the content checks run, and one ulp passes them


def test_rotary_frequencies_from_the_config_are_the_models(arch):
    """The frequencies the pre-RoPE check computes from a config are the ones the model's rotary embedding holds,
    for every architecture; a matching pre-RoPE dictionary is accepted."""
    model = tiny_model(arch)
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    for i, layer_type in enumerate(types):
        inv_freq, scaling = rotary_from_config(model.config, layer_type)
        expected, expected_scaling = rotary_for_layer(model, i)
        assert torch.equal(inv_freq, expected) and scaling == expected_scaling
    SparseSemanticCache(make_dictionary(model, key_space="pre_rope"), config=model.config)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "rope_theta": 5e5,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    ],
)
def test_scaled_rotary_embeddings_are_checked_too(rope_parameters):
    """Scaled RoPE (frequencies and, for YaRN, the attention scaling) computed from the config equals the model's;
    the same dictionary on the unscaled model is refused."""
    scaled = LlamaForCausalLM(LlamaConfig(**COMMON, head_dim=16, rope_parameters=rope_parameters))
    dictionary = make_dictionary(scaled, key_space="pre_rope")
    dictionary.config.rope_scaling = rotary_for_layer(scaled, 0)[1]
    SparseSemanticCache(dictionary, config=scaled.config)
    with pytest.raises(UnsupportedModelError, match="other frequencies|has rope_scaling"):
        SparseSemanticCache(dictionary, config=tiny_model("llama").config)


def smollm2_config(rope_theta: float = 1e5) -> LlamaConfig:
    """The geometry and RoPE of SmolLM2-135M's config.json."""
    return LlamaConfig(
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        num_hidden_layers=30,
        rope_parameters={"rope_theta": rope_theta, "rope_type": "default"},
    )


def gemma3_config(rope_theta: float = 1e6) -> Gemma3TextConfig:
    """The geometry and RoPE of Gemma-3-270m's config.json (``rope_theta`` of its full-attention layers)."""
    return Gemma3TextConfig(
        hidden_size=640,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        num_hidden_layers=18,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
        rope_parameters={
            "full_attention": {"rope_theta": rope_theta, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
        },
    )


SHIPPED_MODELS = {"sta-cache/SmolLM2-135M-Instruct": smollm2_config, "sta-cache/gemma-3-270m": gemma3_config}


@pytest.mark.parametrize("repo_id", sorted(SHIPPED_MODELS))
def test_shipped_dictionaries_carry_a_digest_and_fit_their_models_rotary_embedding(repo_id, monkeypatch, tmp_path):
    """The dictionaries in the wheel are verified at load (digest, contents) and pass the pre-RoPE check against
    their model's config; with another rope_theta they are refused."""
    assert repo_id in packaged_repo_ids()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert DIGEST_KEY in json.loads((resolve_dictionary(repo_id, cache_dir=tmp_path) / CONFIG_NAME).read_text())
    model_config = SHIPPED_MODELS[repo_id]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseSemanticCache.from_pretrained(repo_id, cache_dir=tmp_path, config=model_config())
    with pytest.raises(UnsupportedModelError, match="other frequencies"):
        SparseSemanticCache.from_pretrained(repo_id, cache_dir=tmp_path, config=model_config(rope_theta=3e4))


def test_from_pretrained_takes_the_model(tmp_path):
    model = tiny_model("llama")
    folder = saved(tmp_path)
    assert SparseSemanticCache.from_pretrained(folder, model=model, k_key=3).k_key == 3
    with pytest.raises(UnsupportedModelError, match="3 layers .dictionary: 4"):
        SparseSemanticCache.from_pretrained(saved(tmp_path / "g", make_dictionary(tiny_model("gemma3"))), model=model)
