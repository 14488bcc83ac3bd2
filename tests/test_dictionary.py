"""The dictionary file format, its checks, and resolving Hub repo ids offline through the HF cache."""

from __future__ import annotations

import json
import os

import huggingface_hub.constants
import pytest
import torch

from conftest import make_dictionary, tiny_model
from sta_cache import DictionaryFormatError, KVDictionary, SparseSemanticCache, TopKSAE
from sta_cache.dictionary import CONFIG_NAME, WEIGHTS_NAME
from sta_cache.hub import packaged_repo_ids, place_in_hf_cache


@pytest.fixture
def saved(tmp_path):
    dictionary = make_dictionary(tiny_model("gemma3"), key_space="pre_rope", per_head=False)
    dictionary.save_pretrained(tmp_path / "dict")
    return dictionary, tmp_path / "dict"


def test_round_trip_is_exact_and_writes_no_pickle(saved):
    dictionary, folder = saved
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])
    loaded = KVDictionary.from_pretrained(folder)
    assert loaded.config == dictionary.config
    for (name, a), (_, b) in zip(dictionary.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    card = (folder / "README.md").read_text()
    assert "base_model: tiny-gemma3_text" in card and "pre_rope" in card


def test_fp16_save_halves_the_file(saved, tmp_path):
    dictionary, folder = saved
    dictionary.save_pretrained(tmp_path / "half", dtype=torch.float16)
    assert (tmp_path / "half" / WEIGHTS_NAME).stat().st_size < 0.6 * (folder / WEIGHTS_NAME).stat().st_size
    loaded = KVDictionary.from_pretrained(tmp_path / "half")
    assert torch.allclose(loaded[1].key[0].W_dec, dictionary[1].key[0].W_dec, atol=1e-3)
    assert torch.equal(loaded[1].rope_inv_freq, dictionary[1].rope_inv_freq)  # rotary stays float32


def test_truncated_file_is_a_clear_error(saved):
    _, folder = saved
    weights = folder / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DictionaryFormatError, match="truncated or corrupted"):
        KVDictionary.from_pretrained(folder)


def test_missing_layer_is_a_clear_error(saved):
    _, folder = saved
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["layer_indices"] = [1, 3, 0]
    config["num_layers"] = 4
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(DictionaryFormatError, match=r"missing 9 tensors \(layers \[0\]\)"):
        KVDictionary.from_pretrained(folder)


def test_shape_disagreement_and_bad_config_are_clear_errors(saved):
    _, folder = saved
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "n_atoms": 32}))
    with pytest.raises(DictionaryFormatError, match="has shape .* config.json implies"):
        KVDictionary.from_pretrained(folder)
    (folder / CONFIG_NAME).write_text(json.dumps({k: v for k, v in config.items() if k != "head_dim"}))
    with pytest.raises(DictionaryFormatError, match=r"lacks the fields \['head_dim'\]"):
        KVDictionary.from_pretrained(folder)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(DictionaryFormatError, match="not valid dictionary JSON"):
        KVDictionary.from_pretrained(folder)


def test_unknown_repo_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DictionaryFormatError, match="could not find dictionary 'nobody/nothing'"):
        KVDictionary.from_pretrained("nobody/nothing", cache_dir=tmp_path)


def test_hub_id_resolves_offline_from_the_hf_cache(saved, tmp_path, monkeypatch):
    dictionary, folder = saved
    commit = place_in_hf_cache(folder, tmp_path / "hf", "sta-cache/tiny-gemma3")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = KVDictionary.from_pretrained("sta-cache/tiny-gemma3", cache_dir=tmp_path / "hf")
    assert torch.equal(loaded[3].value[0].W_dec, dictionary[3].value[0].W_dec)
    pinned = KVDictionary.from_pretrained("sta-cache/tiny-gemma3", cache_dir=tmp_path / "hf", revision=commit)
    assert pinned.config == dictionary.config
    model = tiny_model("gemma3")
    cache = SparseSemanticCache.from_pretrained(
        "sta-cache/tiny-gemma3", cache_dir=tmp_path / "hf", config=model.config, k_key=3
    )
    assert cache.k_key == 3 and len(cache.sparse_layers) == 2


def test_topk_sae_encode_decode_shapes_and_relu():
    torch.manual_seed(0)
    sae = TopKSAE(8, 32)
    x = torch.randn(5, 3, 8)
    indices, coefficients = sae.encode(x, 4)
    assert indices.shape == coefficients.shape == (5, 3, 4)
    assert (coefficients >= 0).all()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(32))
    assert sae.decode(indices, coefficients).shape == x.shape


def test_pursuit_dictionaries_store_only_the_decoder(tmp_path):
    dictionary = make_dictionary(tiny_model("llama"), encoder="omp")
    dictionary.save_pretrained(tmp_path / "omp")
    from safetensors import safe_open

    with safe_open(tmp_path / "omp" / WEIGHTS_NAME, "pt") as handle:
        names = set(handle.keys())
    assert names and not any(name.endswith(("W_enc", "b_enc")) for name in names)
    loaded = KVDictionary.from_pretrained(tmp_path / "omp")
    sae = loaded[2].value[0]
    assert sae.W_enc is None and sae.b_enc is None  # nothing held that matching pursuit does not read
    assert all(name.endswith(("W_dec", "b_dec")) for name, _ in loaded.named_parameters())
    held = [*loaded.parameters(), *loaded.buffers()]
    assert loaded.num_bytes() == sum(t.numel() * t.element_size() for t in held)
    assert torch.equal(sae.W_dec, dictionary[2].value[0].W_dec)


def test_packaged_dictionaries_resolve_with_the_hub_offline(monkeypatch, tmp_path):
    """The dictionaries shipped in the wheel load by their Hub ids with no network and an empty HF cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    shipped = packaged_repo_ids()
    assert "sta-cache/SmolLM2-135M-Instruct" in shipped
    for repo_id in shipped:
        dictionary = KVDictionary.from_pretrained(repo_id, cache_dir=tmp_path)
        assert dictionary.config.encoder == "omp" and dictionary.config.key_space == "pre_rope"
