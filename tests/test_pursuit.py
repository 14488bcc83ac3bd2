"""Dictionary learning for matching-pursuit codes (MOD), the default of `sta-cache train`: the method, the run
(held-out check, resume) and its text sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from char_text import CharTokenizer, tiny_llama, write_words
from safetensors.torch import load_file

from conftest import VOCAB, tiny_model
from sta_cache import KVDictionary, SparseSemanticCache
from sta_cache.collect import token_windows
from sta_cache.compat import cache_kwargs
from sta_cache.metrics import fraction_of_variance_unexplained as fvu
from sta_cache.text import TextSource
from sta_cache.training import TrainConfig, checkpoint, learn_mod_dictionary, omp_reconstruct, train_dictionary


def test_mod_learns_a_planted_sparse_dictionary():
    """Vectors made of 3 of 24 planted atoms: MOD from data-initialised atoms explains them far better than the
    initial atoms, on held-out vectors."""
    generator = torch.Generator().manual_seed(0)
    planted = torch.nn.functional.normalize(torch.randn(24, 16, generator=generator), dim=-1)

    def sample(n):
        idx = torch.stack([torch.randperm(24, generator=generator)[:3] for _ in range(n)])
        return torch.einsum("nk,nkd->nd", torch.randn(n, 3, generator=generator), planted[idx])

    train, held_out = sample(3000), sample(500)
    start = torch.nn.functional.normalize(train[:24], dim=-1)
    atoms, bias, history = learn_mod_dictionary(train, start, torch.zeros(16), k=3, iterations=20)
    before = fvu(held_out, omp_reconstruct(held_out, start, torch.zeros(16), 3))
    after = fvu(held_out, omp_reconstruct(held_out, atoms, bias, 3))
    assert history[-1] < history[0]
    assert after < 0.1 and after < before / 3
    assert torch.allclose(atoms.norm(dim=-1), torch.ones(24), atol=1e-5)


def test_default_training_builds_a_working_mod_dictionary(tmp_path):
    model = tiny_model("gemma3")
    text = tmp_path / "text.txt"
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, VOCAB, (4000,), generator=generator).tolist()

    class Tokenizer:  # one id per whitespace-separated number
        bos_token_id = None

        def __call__(self, text, add_special_tokens=True, verbose=True):
            return {"input_ids": [int(t) if t.isdigit() else 1 for t in text.split()]}

    text.write_text("\n".join(" ".join(map(str, tokens[i : i + 50])) for i in range(0, 4000, 50)) + "\n")
    config = TrainConfig(n_atoms=48, k_key=4, k_value=6, context=32, max_tokens=12 * 32, vectors=400, iterations=2)
    dictionary = train_dictionary(model, Tokenizer(), text, config, tmp_path / "dict", progress=False)
    assert dictionary.config.layer_indices == [1, 3] and dictionary.config.encoder == "omp"
    loaded = KVDictionary.from_pretrained(tmp_path / "dict")
    assert torch.equal(loaded[3].value[0].W_dec, dictionary[3].value[0].W_dec)
    cache = SparseSemanticCache(loaded, residual_length=2, num_sink_tokens=1, encode_batch=1, config=model.config)
    with torch.no_grad():
        model.set_attn_implementation("sta")
        logits = model(torch.randint(1, VOCAB, (1, 12)), **cache_kwargs(model, cache)).logits
        logits = model(torch.randint(1, VOCAB, (1, 1)), **cache_kwargs(model, cache)).logits
    # 13 tokens: 1 sink, a window of 2, and the rest coded as soon as attention has read them
    assert torch.isfinite(logits).all() and cache.sparse_layers[0].num_compressed == 10


# ------------------------------------------------------------------------------------------ the training command
def mod_config(**overrides) -> TrainConfig:
    base = dict(n_atoms=48, k_key=4, k_value=6, context=64, max_tokens=12 * 64, eval_tokens=320, vectors=1200)
    return TrainConfig(**{**base, "iterations": 2, **overrides})


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    return write_words(tmp_path_factory.mktemp("words") / "words.txt", lines=400, seed=1)


def test_default_method_is_mod_with_omp_codes_and_bad_settings_are_refused():
    config = TrainConfig()
    assert (config.method, config.encoder, config.key_space, config.max_tokens) == ("mod", "omp", "pre_rope", 12288)
    assert TrainConfig(method="sae").encoder == "topk" and TrainConfig(method="sae").max_tokens == 60_000
    with pytest.raises(ValueError, match="encoder is 'omp'"):
        TrainConfig(method="mod", encoder="topk")
    with pytest.raises(ValueError, match="'mod', 'sae'"):
        TrainConfig(method="svd")
    with pytest.raises(ValueError, match="shard"):
        TrainConfig(shard="heads")


def test_mod_run_ends_with_a_heldout_check_in_its_model_card(words, tmp_path):
    dictionary = train_dictionary(tiny_llama(), CharTokenizer(), words, mod_config(), tmp_path / "d", progress=False)
    evaluation = dictionary.config.evaluation
    assert isinstance(evaluation["perplexity_ratio"], float) and 0.5 < evaluation["perplexity_ratio"] < 2
    assert set(evaluation["per_layer"]) == {"0", "1"} and evaluation["key_cosine_omp"] > 0.5
    assert dictionary.config.training["world_size"] == 1 and dictionary.config.training["tokens"] == 12 * 64
    card = (tmp_path / "d" / "README.md").read_text()
    assert "Held-out reconstruction cosine per layer" in card and "| perplexity_ratio |" in card


class Interrupted(Exception):
    pass


def test_interrupted_mod_run_resumes_to_the_same_atoms(words, tmp_path, monkeypatch):
    config = mod_config(check_perplexity=False)
    model = tiny_llama()
    train_dictionary(model, CharTokenizer(), words, config, tmp_path / "whole", progress=False)
    real_save, saves = checkpoint.save_checkpoint, []

    def save_then_die(path, payload):
        real_save(path, payload)
        saves.append(path)
        if len(saves) == 2:  # two of the four dictionaries finished
            raise Interrupted

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train_dictionary(model, CharTokenizer(), words, config, tmp_path / "cut", progress=False)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    with pytest.raises(ValueError, match="different run"):
        train_dictionary(model, CharTokenizer(), words, mod_config(seed=5), tmp_path / "cut", progress=False)
    train_dictionary(model, CharTokenizer(), words, config, tmp_path / "cut", progress=False)
    whole = load_file(tmp_path / "whole" / "dictionary.safetensors")
    cut = load_file(tmp_path / "cut" / "dictionary.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[name], cut[name]) for name in whole)
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()


def test_text_streams_the_same_from_a_datasets_folder_as_from_a_file(words, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "dataset"
    folder.mkdir()
    lines = words.read_text().splitlines()
    (folder / "train.jsonl").write_text(
        "".join(json.dumps({"text": line, "id": i}) + "\n" for i, line in enumerate(lines))
    )
    source = TextSource(dataset=str(folder))
    from_file = token_windows(CharTokenizer(), words, 64, 20)
    from_dataset = token_windows(CharTokenizer(), source, 64, 20)
    assert from_file.shape == (20, 64) and torch.equal(from_file, from_dataset)
    assert source.fingerprint()["dataset"] == str(folder)
    with pytest.raises(KeyError, match="no column 'body'"):
        token_windows(CharTokenizer(), TextSource(dataset=str(folder), column="body"), 64, 2)
    with pytest.raises(ValueError, match="not both"):
        TextSource(path=words, dataset=str(folder))
