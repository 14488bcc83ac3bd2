"""What the C-kernel loader trusts (kernels/cpu_kernels.py): only a library it built itself, in a folder nobody else
can write to, checked against the SHA-256 recorded at build time; and how it fails: once per process, within a
timeout, leaving nothing behind, "auto" falling back to PyTorch with one warning and "cpu" saying why.

Compilers here are shell scripts set as ``$CC`` that log each run: most copy a library built once per session (so
that a "build" takes milliseconds), others fail, hang or produce a library without the kernels.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, make_dictionary, tiny_model
from sta_cache import SparseSemanticCache
from sta_cache.compat import cache_kwargs
from sta_cache.kernels import cpu_kernels, dispatch, reference

CPU = torch.device("cpu")
COMPILER = shutil.which("gcc") or shutil.which("cc")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="needs a C compiler")


def compile_library(source: str, out: Path, *flags: str) -> Path:
    c_file = out.with_suffix(".c")
    c_file.write_text(source)
    subprocess.run([COMPILER, *cpu_kernels.FLAGS, *flags, str(c_file), "-o", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def libraries(tmp_path_factory) -> dict[str, Path]:
    """The real kernels (portable flags), a library without them, and a planted one whose constructor writes
    ``marker``, checked to do so when loaded: a test that finds no marker shows it was not loaded."""
    folder = tmp_path_factory.mktemp("libraries")
    marker = folder / "marker"
    planted_source = (
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        '    FILE *marker = fopen(MARKER, "w");\n'
        "    if (marker) fclose(marker);\n"
        "}\n"
    )
    built = {
        "kernels": compile_library(cpu_kernels.SOURCE.read_text(), folder / "kernels.so"),
        "empty": compile_library("int sta_nothing(void) { return 0; }\n", folder / "empty.so"),
        "planted": compile_library(planted_source, folder / "planted.so", f'-DMARKER="{marker}"'),
        "marker": marker,
    }
    probe = shutil.copy(built["planted"], folder / "probe.so")
    ctypes.CDLL(str(probe))
    assert marker.exists(), "the planted library's constructor must leave a marker when it is loaded"
    marker.unlink()
    return built


@pytest.fixture
def home(monkeypatch, tmp_path) -> Path:
    """A fresh ``$STA_CACHE_HOME`` and temporary folder, and a loader that remembers nothing."""
    monkeypatch.setenv("STA_CACHE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STA_CACHE_CC_TIMEOUT", raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    cpu_kernels.reset()
    dispatch._warn_once.cache_clear()
    yield tmp_path / "home"
    cpu_kernels.reset()
    dispatch._warn_once.cache_clear()


def fake_compiler(monkeypatch, folder: Path, body: str) -> Path:
    """Set ``$CC`` to a script that logs each run to ``folder/runs`` and then runs ``body``, where ``$out`` is the
    output file (the last argument). Returns the log."""
    log, compiler = folder / "runs", folder / "cc"
    compiler.write_text(f'#!/bin/sh\necho run >> "{log}"\nfor out; do :; done\n{body}\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    return log


def runs(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def copying_compiler(monkeypatch, tmp_path, libraries) -> Path:
    return fake_compiler(monkeypatch, tmp_path, f'cp "{libraries["kernels"]}" "$out"')


def library_path(home: Path) -> Path:
    return home / "kernels" / cpu_kernels._library_name(os.environ["CC"])


def loader_warnings(call) -> list[str]:
    """The sta_cache warnings that ``call()`` raises, each counted even if an equal one was raised before."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "sta_cache" in str(w.message)]


def assert_the_kernels_work() -> None:
    """The loaded library computes what the reference does (OMP codes of 8 vectors over 32 atoms)."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=-1)
    x, bias = torch.randn(8, 16, generator=g), torch.zeros(16)
    indices, coefficients = cpu_kernels.omp_encode(x, atoms, bias, 4)
    want_indices, want_coefficients = reference.omp_encode_reference(x, atoms, bias, 4)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(coefficients, want_coefficients, rtol=1e-4, atol=1e-5)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize(
    "plant",
    [
        "without a digest",
        "with a wrong digest",
        "in a world-writable folder",
        "in another user's folder",
        "as another user's file",
        "through a linked folder",
    ],
)
def test_a_planted_library_is_never_loaded(home, copying_compiler, libraries, plant) -> None:
    """Anyone who can compute the library's name can put a file there; its constructor must never run. The file is
    rebuilt over in the private folder; in a folder others can write to or own, the kernels are built in a private
    temporary folder instead, with one warning."""
    if "another user" in plant and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    target = library_path(home)
    target.parent.mkdir(parents=True, mode=0o700)
    shutil.copy(libraries["planted"], target)
    digest = target.with_name(target.name + ".sha256")
    planted_digest = hashlib.sha256(target.read_bytes()).hexdigest()
    digest.write_text("0" * 64 if plant == "with a wrong digest" else planted_digest)
    if plant == "without a digest":
        digest.unlink()
    refused = plant in ("in a world-writable folder", "in another user's folder", "through a linked folder")
    if plant == "through a linked folder":  # a private folder, but reached through a link someone else may have made
        target.parent.rename(home / "elsewhere")
        target.parent.symlink_to(home / "elsewhere")
    elif plant == "in a world-writable folder":
        target.parent.chmod(0o777)
    elif plant == "in another user's folder":
        os.chown(target.parent, 4242, 4242)
    elif plant == "as another user's file":
        os.chown(target, 4242, 4242)
        os.chown(digest, 4242, 4242)

    messages = loader_warnings(cpu_kernels.library)

    assert not libraries["marker"].exists(), "the planted library was loaded"
    assert runs(copying_compiler) == 1
    assert_the_kernels_work()
    if refused:
        assert len(messages) == 1 and "temporary folder" in messages[0]
        assert ("is a link" if "link" in plant else "not a folder of this user") in messages[0]
        assert hashlib.sha256(target.read_bytes()).hexdigest() == planted_digest  # left alone
        assert leftovers(Path(tempfile.gettempdir())) == []
    else:
        assert messages == []
        assert target.read_bytes() == libraries["kernels"].read_bytes()
        assert digest.read_text().strip() == hashlib.sha256(target.read_bytes()).hexdigest()


def test_a_truncated_library_is_rebuilt(home, copying_compiler, libraries) -> None:
    """A truncated library used to pass the existence check and kill the process with SIGBUS at the first forward;
    its SHA-256 no longer matches the recorded one, so it is rebuilt before anything loads it."""
    cpu_kernels.library()
    target = library_path(home)
    whole = target.read_bytes()
    # A new file renamed over it: the library loaded above is mapped, and truncating that file would crash us.
    target.with_name("truncated").write_bytes(whole[: len(whole) // 2])
    os.replace(target.with_name("truncated"), target)
    cpu_kernels.reset()

    cpu_kernels.library()

    assert runs(copying_compiler) == 2
    assert target.read_bytes() == whole
    assert_the_kernels_work()


def test_a_library_without_the_kernels_is_not_used(monkeypatch, home, tmp_path, libraries) -> None:
    """A library that lacks the kernels' symbols raised a raw AttributeError; now it is CPUKernelUnavailable, on
    which "auto" falls back with one warning, and its digest is dropped so that the next process rebuilds it."""
    log = fake_compiler(monkeypatch, tmp_path, f'cp "{libraries["empty"]}" "$out"')
    with pytest.raises(cpu_kernels.CPUKernelUnavailable, match="has no sta_attention"):
        cpu_kernels.library()
    assert not library_path(home).with_name(library_path(home).name + ".sha256").exists()
    messages = loader_warnings(lambda: [dispatch.resolve_backend("auto", CPU, 64) for _ in range(3)])
    assert len(messages) == 1 and "has no sta_attention" in messages[0]
    assert dispatch.resolve_backend("auto", CPU, 64) == "torch"
    with pytest.raises(cpu_kernels.CPUKernelUnavailable, match="backend='cpu' needs the C kernels.*has no sta_"):
        dispatch.resolve_backend("cpu", CPU, 64)
    assert runs(log) == 1


def test_a_read_only_disk_falls_back_to_pytorch_or_says_why(monkeypatch, home, copying_compiler) -> None:
    """Writing anything fails (EROFS, as on a read-only HOME): "auto" attends through PyTorch with one warning, "cpu"
    raises CPUKernelUnavailable with the reason, the build is tried once in each folder and nothing is left."""

    def read_only(source, target, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))

    monkeypatch.setattr(os, "replace", read_only)
    messages = loader_warnings(lambda: [dispatch.resolve_backend("auto", CPU, 64) for _ in range(3)])
    assert len(messages) == 1 and "Read-only file system" in messages[0]
    assert dispatch.resolve_backend("auto", CPU, 64) == "torch"
    with pytest.raises(cpu_kernels.CPUKernelUnavailable, match="backend='cpu' needs the C kernels.*Read-only file"):
        dispatch.resolve_backend("cpu", CPU, 64)
    assert runs(copying_compiler) == 2  # the cache folder, then a temporary one
    assert leftovers(home / "kernels") == [] and leftovers(Path(tempfile.gettempdir())) == []


def test_a_model_on_a_read_only_disk_runs_with_the_default_backend(monkeypatch, home, copying_compiler) -> None:
    """The first forward used to raise OSError: Read-only file system with backend="auto"; now every layer attends
    through PyTorch after one warning, and backend="cpu" fails on the first forward with the reason."""

    def read_only(source, target, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))

    monkeypatch.setattr(os, "replace", read_only)
    model = tiny_model("llama", "sta")
    dictionary = make_dictionary(model)
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = SparseSemanticCache(dictionary, residual_length=2, num_sink_tokens=1, config=model.config)
    with torch.no_grad():
        messages = loader_warnings(lambda: model(ids, **cache_kwargs(model, cache)))
    assert len(messages) == 1 and "Read-only file system" in messages[0]
    assert [layer.backend for layer in cache.sparse_layers] == ["torch"] * len(cache.sparse_layers)
    cache = SparseSemanticCache(dictionary, config=model.config, backend="cpu")
    with torch.no_grad(), pytest.raises(cpu_kernels.CPUKernelUnavailable, match="Read-only file system"):
        model(ids, **cache_kwargs(model, cache))


def test_a_read_only_cache_folder_builds_in_a_temporary_one(monkeypatch, home, copying_compiler) -> None:
    """Where only the cache folder cannot be written, the kernels are built in a private temporary folder (removed
    once loaded), with one warning."""
    real_mkdir = os.mkdir

    def read_only_home(path, *args, **kwargs):
        if Path(path).is_relative_to(home):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_home)
    messages = loader_warnings(lambda: [dispatch.resolve_backend("auto", CPU, 64) for _ in range(3)])
    assert dispatch.resolve_backend("auto", CPU, 64) == "cpu"
    assert len(messages) == 1 and "temporary folder" in messages[0] and "Read-only file system" in messages[0]
    assert_the_kernels_work()
    assert runs(copying_compiler) == 1
    assert not home.exists() and leftovers(Path(tempfile.gettempdir())) == []


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_hanging_compiler_is_stopped(monkeypatch, home, tmp_path) -> None:
    """A compiler that hangs is killed past the timeout with what it started, not retried with other flags or by
    later calls, and its scratch folder is removed."""
    pid_file = tmp_path / "pid"
    log = fake_compiler(monkeypatch, tmp_path, f'sleep 60 & echo $! > "{pid_file}"\nwait')
    monkeypatch.setenv("STA_CACHE_CC_TIMEOUT", "0.5")
    start = time.monotonic()
    with pytest.raises(cpu_kernels.CPUKernelUnavailable, match="did not finish within 0.5 s"):
        cpu_kernels.library()
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 5
    while process_alive(int(pid_file.read_text())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(int(pid_file.read_text())), "the compiler's child survived the timeout"
    with pytest.raises(cpu_kernels.CPUKernelUnavailable, match="did not finish"):
        cpu_kernels.library()
    assert runs(log) == 1
    assert leftovers(home / "kernels") == []


def test_a_failing_compiler_runs_once_per_process(monkeypatch, home, tmp_path) -> None:
    """A failing compiler used to be run 3 times (once per flag set) by each layer of each new cache."""
    log = fake_compiler(monkeypatch, tmp_path, "exit 1")
    messages = loader_warnings(lambda: [dispatch.resolve_backend("auto", CPU, 64) for _ in range(30)])
    assert len(messages) == 1 and "failed" in messages[0]
    with pytest.raises(cpu_kernels.CPUKernelUnavailable, match="backend='cpu' needs the C kernels.*failed"):
        dispatch.resolve_backend("cpu", CPU, 64)
    assert runs(log) == len(cpu_kernels.ATTEMPTS)
    cpu_kernels.reset()
    with pytest.raises(cpu_kernels.CPUKernelUnavailable):
        cpu_kernels.library()
    assert runs(log) == 2 * len(cpu_kernels.ATTEMPTS)
    assert leftovers(home / "kernels") == []


def test_the_built_files_are_private_under_any_umask(home, copying_compiler) -> None:
    """Under umask 000 the folder and the library used to be created 0777, writable by everyone."""
    previous = os.umask(0)
    try:
        cpu_kernels.library()
    finally:
        os.umask(previous)
    target = library_path(home)
    modes = [stat.S_IMODE(path.stat().st_mode) for path in (target.parent, target, Path(f"{target}.sha256"))]
    assert modes == [0o700, 0o700, 0o600]
