"""What a user meets from the repo root: the repo's kernels/ folder must never shadow the Hugging Face ``kernels``
library that transformers imports, with that library installed or not; ``import sta_cache`` stays cheap."""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run from the repo root, where `python -c` and `python -m pytest` put the current folder first on sys.path.
IMPORTS = f"""
import sys
import sta_cache, transformers.activations
from transformers.integrations import hub_kernels
from transformers.utils.import_utils import is_kernels_available
import sta_cache.kernels.dispatch
import kernels
where = getattr(kernels, "__file__", None)
assert where is None or not where.startswith({str(REPO / "kernels")!r}), f"kernels resolved to the repo: {{where}}"
print("kernels available:", is_kernels_available(), "| kernels from:", where)
"""


def _run(args: list[str], env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env or os.environ.copy()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_repo_root_imports_with_the_hugging_face_kernels_library_installed() -> None:
    # A dev dependency (transformers[kernels]): this case must run, not skip.
    importlib.metadata.version("kernels")
    out = _run(["-c", IMPORTS])
    assert "kernels available: True" in out and "site-packages" in out


def test_repo_root_imports_with_the_hugging_face_kernels_library_hidden(tmp_path: Path) -> None:
    """The same environment without the library: a site folder of links to every installed distribution except
    ``kernels`` (module and metadata), read with ``-S`` so the real site-packages stays off sys.path."""
    visible = tmp_path / "site"
    visible.mkdir()
    for site_packages in site.getsitepackages():
        for entry in Path(site_packages).iterdir():
            hidden = entry.name == "kernels" or entry.name.lower().startswith("kernels-")
            if not hidden and not (visible / entry.name).exists():
                (visible / entry.name).symlink_to(entry)
    out = _run(["-S", "-c", f"import site; site.addsitedir({str(visible)!r})\n{IMPORTS}"])
    assert "kernels available: False" in out


def test_import_sta_cache_registers_sta_attention_without_importing_transformers_models() -> None:
    """``import sta_cache`` loads neither torch nor transformers' modelling code (so ``sta-cache --help`` is
    instant); "sta" is registered as soon as transformers' modelling code is imported, in either order."""
    _run(
        [
            "-c",
            "import sys, sta_cache\n"
            "heavy = [m for m in ('torch', 'transformers.modeling_utils') if m in sys.modules]\n"
            "assert not heavy, heavy",
        ]
    )
    check = (
        "from transformers import AttentionInterface, AttentionMaskInterface\n"
        "assert 'sta' in AttentionInterface._global_mapping and 'sta' in AttentionMaskInterface._global_mapping\n"
    )
    _run(["-c", "import sta_cache\n" + check])
    _run(["-c", "from transformers import AutoModelForCausalLM\nimport sta_cache\n" + check])
    _run(
        [
            "-c",
            "import sta_cache\nfrom transformers import LlamaForCausalLM, LlamaConfig\n"
            "config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
            "                     num_attention_heads=2, vocab_size=50)\n"
            "model = LlamaForCausalLM._from_config(config, attn_implementation='sta')\n"
            "assert model.config._attn_implementation == 'sta'\n",
        ]
    )


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["train-pursuit"], ["analyze"], ["eval"]])
def test_cli_help_prints_without_loading_torch(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sta_cache", *command, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "usage: sta-cache" in result.stdout, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "numpy"}


def test_every_cli_option_says_what_it_does_and_lists_its_choices() -> None:
    from sta_cache.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) >= {"demo", "train", "train-pursuit", "analyze", "eval"}
    for name, parser in subparsers.choices.items():
        assert parser.description, f"{name} has no description"
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, f"{name} {action.option_strings}: no help text"
            assert "unset" not in action.help
        by_dest = {action.dest: action for action in parser._actions}
        for mode in ("key_space", "encoder", "init", "b_dec_init"):
            if mode in by_dest:
                assert by_dest[mode].choices, f"{name} --{mode} lists no choices"


def test_every_benchmark_option_says_what_it_does() -> None:
    """Benchmarks are scripts (run, not imported), so their parsers are read from the source: every
    ``add_argument`` call carries a ``help=`` of more than ten characters, or ``argparse.SUPPRESS`` for internal
    ones."""
    scripts = sorted((REPO / "benchmarks").glob("*.py"))
    assert len(scripts) >= 8
    options = 0
    for script in scripts:
        for node in ast.walk(ast.parse(script.read_text(), filename=str(script))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                options += 1
                where = f"{script.name}:{node.lineno}"
                given = {keyword.arg: keyword.value for keyword in node.keywords}
                assert "help" in given, f"{where}: no help text"
                text = given["help"]
                if isinstance(text, ast.Attribute):
                    assert text.attr == "SUPPRESS", f"{where}: help is {ast.unparse(text)}"
                    continue
                literal = ast.literal_eval(text) if not isinstance(text, ast.JoinedStr) else ast.unparse(text)
                assert isinstance(literal, str) and len(literal) > 10, f"{where}: help {literal!r} says too little"
    assert options >= 40


def test_train_device_option(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from sta_cache.cli import _training_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _training_device("auto") == torch.device("cpu")
    assert _training_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        _training_device("cuda:1")
    with pytest.raises(SystemExit, match="expected cpu, cuda"):
        _training_device("gpu")
