"""The layering of the package, checked on the source: the cache core never imports training, evaluation or the
command line, and the kernels import nothing from the rest of sta_cache."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sta_cache"
# What `SparseSemanticCache` needs at inference, and what it is built on. Everything else (collect, embedded, demo,
# training/, evaluation/, cli) may import the core, never the other way round.
CORE = (
    "allocation",
    "attention",
    "budgets",
    "cache",
    "compat",
    "configs",
    "dictionary",
    "distributed",
    "dtypes",
    "geometry",
    "hub",
    "layer",
    "lloyd_max",
    "memory",
    "metrics",
    "packing",
    "registration",
    "rotated_values",
    "sae",
    "validation",
)
NEVER_IN_CORE = ("training", "evaluation", "cli", "demo", "__main__")


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules that the file imports (at top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import geometry`
    return names


def _sta_cache_modules(names: set[str]) -> set[str]:
    """The first level below sta_cache of each imported name: ``sta_cache.training.loop`` -> ``training``."""
    return {name.split(".")[1] for name in names if name.startswith("sta_cache.") and name.count(".") >= 1}


@pytest.mark.parametrize("module", CORE)
def test_core_imports_only_the_core_and_the_kernels(module: str) -> None:
    imported = _sta_cache_modules(_imports(PACKAGE / f"{module}.py", "sta_cache"))
    assert not imported & set(NEVER_IN_CORE), f"sta_cache.{module} imports {sorted(imported & set(NEVER_IN_CORE))}"
    outside = imported - set(CORE) - {"kernels"}
    assert not outside, f"sta_cache.{module} imports {sorted(outside)}, which are not part of the core"


def test_every_core_module_exists() -> None:
    assert all((PACKAGE / f"{module}.py").is_file() for module in CORE)


@pytest.mark.parametrize("path", sorted((PACKAGE / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_nothing_from_sta_cache(path: Path) -> None:
    imported = _imports(path, "sta_cache.kernels")
    foreign = {name for name in imported if name.startswith("sta_cache") and not name.startswith("sta_cache.kernels")}
    assert not foreign, f"kernels/{path.name} imports {sorted(foreign)}"


def test_kernels_cache_folder_is_the_package_cache_folder(monkeypatch, tmp_path: Path) -> None:
    from sta_cache.embedded import default_cache_dir
    from sta_cache.kernels import cpu_kernels

    monkeypatch.setenv("STA_CACHE_HOME", str(tmp_path))
    assert cpu_kernels._cache_home() == default_cache_dir() == tmp_path
    monkeypatch.delenv("STA_CACHE_HOME")
    assert cpu_kernels._cache_home() == default_cache_dir()


def test_dtype_names_are_the_configs_choices() -> None:
    from typing import get_args

    from sta_cache.configs import CoefficientDtype, WeightDtype
    from sta_cache.dtypes import DTYPES, LEVEL_NAMES, SHORT_NAMES

    assert set(DTYPES) | set(LEVEL_NAMES) == set(SHORT_NAMES) == set(get_args(CoefficientDtype))
    assert not set(DTYPES) & set(LEVEL_NAMES) and set(DTYPES) >= set(get_args(WeightDtype))


def test_the_kernels_pursuits_are_the_configs_choices() -> None:
    """The kernels cannot import the configs (see above), so the two lists of pursuits are kept equal here."""
    from typing import get_args

    from sta_cache.configs import Pursuit
    from sta_cache.kernels.reference import PURSUITS

    assert get_args(Pursuit) == PURSUITS
