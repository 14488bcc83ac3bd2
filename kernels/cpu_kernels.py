"""The ``"cpu"`` backend: decode-into-attention and OMP encoding in C (``cpu_kernels.c``).

PyTorch's CPU path pays for intermediates on every decode step: a CSR matrix of the codes, keys rebuilt as
``[tokens, d]``, a ``[rows, tokens * k]`` scatter into atom space. The C kernels stream each token's codes once
and keep everything else in registers and L1; packed indices and one-byte coefficients are widened in the same
pass. Attention is one call (:func:`sparse_attention`): sinks, codes, window, softmax and output, with no PyTorch
op between the passes, which at short contexts cost more than the arithmetic. OMP encoding runs per group of 8
vectors without any per-step tensor operation (:func:`omp_encode`).

The source is compiled once per machine with the system C compiler (``$CC``, else ``cc``/``gcc``; ``-O3
-march=native -fopenmp`` where accepted) into the sta_cache cache folder and loaded with ctypes; ctypes releases the
GIL. Its OpenMP runtime is the ``libgomp.so.1`` that PyTorch has already loaded, and it uses
``torch.get_num_threads()`` threads.

Loading a shared library runs its code, so the loader trusts only what it built itself (:func:`library`): the
``kernels`` folder must be a folder (not a link) of this user that nobody else can write to (else the kernels are
built in a fresh private temporary folder), and a library is loaded only if it is a file of this user, writable by
nobody else, whose SHA-256 is the one recorded beside it at build time; anything else is rebuilt. The compiler runs
under a timeout (:data:`BUILD_TIMEOUT_S`), and the outcome, failures included, is kept for the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import math
import os
import platform
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .reference import (
    LEVEL_SCALE_DTYPE,
    PURSUITS,
    CompressedKV,
    byte_float_table,
    omp_encode_reference,
    rope_cos_sin,
    rope_table,
)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c11")
# Tried in order: tuned for this CPU with OpenMP threads, then portable, then single-threaded (e.g. Apple clang,
# which has no -fopenmp; the OpenMP pragmas are then ignored and the results are the same).
ATTEMPTS = (("-march=native", "-fopenmp", *FLAGS), ("-fopenmp", *FLAGS), FLAGS)
# Seconds a compiler run may take (about 1 s is usual) before it is stopped; $STA_CACHE_CC_TIMEOUT overrides it.
BUILD_TIMEOUT_S = 120.0
# On Linux a folder is reached through its open descriptor once it has been checked (/proc/<pid>/fd/<fd>, a path
# the compiler can use too), so that swapping the path for another folder afterwards changes nothing; elsewhere the
# checked path is used again.
_PROC_FD = Path("/proc/self/fd").is_dir()

_INDEX_KINDS = {torch.uint8: 0, torch.int16: 1, torch.int32: 2, torch.int64: 3}
_PACKED = 4
_IMPLICIT = 5
_COEFFICIENT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_TABLE8 = 3
_LEVELS = 4


_ATTENTION_POINTERS = (
    "queries",
    "sink_keys",
    "sink_values",
    "window_keys",
    "window_values",
    "mask",
    "key_atoms",
    "key_bias",
    "value_atoms",
    "value_bias",
    "atom_scores",
    "positions",
    "cos_table",
    "sin_table",
)
_ATTENTION_SIZES = (
    "batch",
    "heads",
    "rows",
    "query_len",
    "dim",
    "sinks",
    "window",
    "key_dictionaries",
    "key_n_atoms",
    "value_dictionaries",
    "value_n_atoms",
)
_DENSE = ("sink_keys", "sink_values", "window_keys", "window_values")


class CPUKernelUnavailable(RuntimeError):
    """No C compiler, or the kernels did not build or load on this machine."""


class _Codes(ctypes.Structure):
    """Mirror of ``codes_t`` in cpu_kernels.c."""

    _fields_ = [
        ("indices", ctypes.c_void_p),
        ("coefficients", ctypes.c_void_p),
        ("table8", ctypes.c_void_p),
        ("level_values", ctypes.c_void_p),
        ("tokens", ctypes.c_int64),
        ("k", ctypes.c_int32),
        ("index_kind", ctypes.c_int32),
        ("index_bits", ctypes.c_int32),
        ("packed_row", ctypes.c_int32),
        ("coefficient_kind", ctypes.c_int32),
        ("level_bits", ctypes.c_int32),
        ("level_row", ctypes.c_int32),
    ]


class _Attention(ctypes.Structure):
    """Mirror of ``attention_t`` in cpu_kernels.c."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in _ATTENTION_POINTERS),
        *((name, ctypes.c_float) for name in ("rope_scaling", "scaling", "softcap")),
        *((name, ctypes.c_int64) for name in _ATTENTION_SIZES),
    ]


def _cpu_flags() -> list[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            features = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        features = ""
    return features.partition(":")[2].split()


def _machine_tag() -> str:
    """What ``-march=native`` depends on: a build is reused only on a CPU with the same features."""
    return f"{platform.machine()} {platform.processor()} {' '.join(_cpu_flags())}"


def _library_name(compiler: str) -> str:
    """The library's file name, keyed by what the build depends on: source, compiler, flags and CPU."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(f"{compiler} {ATTEMPTS} {_machine_tag()}".encode())
    return f"cpu_kernels-{digest.hexdigest()[:16]}.so"


def _open_private(path: Path) -> int:
    """A descriptor of the folder ``path``, created 0700 if missing. A folder that another user owns or can write
    to is refused (PermissionError): whoever can write there chooses the code that loading a library runs. So is a
    link, which whoever made it may have pointed at any folder of this user."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink():  # O_NOFOLLOW refuses it below too, but with a puzzling "Not a directory"
        raise PermissionError(f"{path} is a link; only a real folder is used")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        os.close(fd)
        raise PermissionError(
            f"{path} (owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)}) is not a folder of this user that "
            "only it can write to; remove it, or `chmod 700` it if it is yours"
        )
    return fd


def _read_own(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a link) of this user that nobody else can write to."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:  # a link
            return None
        raise
    with open(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            return None
        return file.read()


def _verified(folder: Path, name: str) -> bool:
    """Whether ``folder/name`` is a library built here: it and the SHA-256 recorded beside it at build time are
    files of this user that nobody else can write to, and they agree (a truncated or replaced library does not)."""
    recorded, built = _read_own(folder / f"{name}.sha256"), _read_own(folder / name)
    return recorded is not None and built is not None and hashlib.sha256(built).hexdigest().encode() == recorded.strip()


def _compile(command: list[str]) -> tuple[int, str]:
    """Run the compiler -> (exit status, its messages). Past the timeout it is killed with its whole process group
    (cc1, as and ld run as its children) and CPUKernelUnavailable is raised."""
    timeout = float(os.environ.get("STA_CACHE_CC_TIMEOUT", BUILD_TIMEOUT_S))
    try:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", process_group=0
        ) as process:
            try:
                output, _ = process.communicate(timeout=timeout)
            except BaseException:  # the timeout, or Ctrl-C, which the compiler's own process group does not get
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                raise
    except subprocess.TimeoutExpired:
        raise CPUKernelUnavailable(
            f"{command[0]} did not finish within {timeout:g} s (set STA_CACHE_CC_TIMEOUT to allow more)"
        ) from None
    return process.returncode, output


def _build(compiler: str, folder: Path, name: str) -> None:
    """Compile the kernels to ``folder/name`` with the first of :data:`ATTEMPTS` that the compiler accepts, and
    record their SHA-256 in ``folder/name.sha256``. Both are written in a private scratch folder and renamed into
    place, so that no process reads a half-written file; the scratch folder is removed in every case."""
    with tempfile.TemporaryDirectory(prefix=".build-", dir=folder) as scratch:
        built, digest = Path(scratch) / name, Path(scratch) / f"{name}.sha256"
        errors = []
        for flags in ATTEMPTS:
            status, output = _compile([compiler, *flags, str(SOURCE), "-lm", "-o", str(built)])
            if status == 0:
                break
            errors.append(output.strip())
        else:
            raise CPUKernelUnavailable(f"building {SOURCE.name} with {compiler} failed:\n" + "\n".join(errors))
        os.chmod(built, 0o700)  # whatever the umask, nobody else may write the code that this process runs
        with open(os.open(digest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(hashlib.sha256(built.read_bytes()).hexdigest() + "\n")
        os.replace(built, folder / name)
        os.replace(digest, folder / digest.name)


def _declare(lib: ctypes.CDLL, path: Path) -> ctypes.CDLL:
    """Give the kernels their C signatures; a library that lacks one was not built from :data:`SOURCE`."""
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    codes = ctypes.POINTER(_Codes)
    signatures = {
        "sta_attention": ([ctypes.POINTER(_Attention), codes, codes, p, i32], ctypes.c_int),
        "sta_omp_encode": ([p, p, p, i64, i64, i64, i64, f32, i32, p, p, i32], ctypes.c_int),
        "sta_omp_encode_gram": ([p, p, p, i32, p, i64, i64, i64, i64, f32, i32, p, p, i32], ctypes.c_int),
        "sta_rotated_encode": ([p, p, p, i32, p, i32, i64, i64, p, i64, p, i32], None),
    }
    for symbol, (argtypes, restype) in signatures.items():
        try:
            function = getattr(lib, symbol)
        except AttributeError:
            raise CPUKernelUnavailable(f"{path} has no {symbol}: it was not built from {SOURCE.name}") from None
        function.argtypes, function.restype = argtypes, restype
    return lib


def _load_from(path: Path, name: str, compiler: str) -> ctypes.CDLL:
    """The kernels in the private folder ``path``, built there first unless a verified build is there."""
    fd = _open_private(path)
    folder = Path(f"/proc/{os.getpid()}/fd/{fd}") if _PROC_FD else path
    try:
        if not _verified(folder, name):
            _build(compiler, folder, name)
            if not _verified(folder, name):
                raise CPUKernelUnavailable(f"the kernels built in {path} do not match their recorded SHA-256")
        lib = ctypes.CDLL(str(folder / name))
    except BaseException:
        os.close(fd)
        raise
    # fd stays open for the life of the process: the library was loaded through it, and the dynamic loader knows
    # it by that path, which must not name another folder later (a second load would get this library back).
    try:
        return _declare(lib, path / name)
    except CPUKernelUnavailable:
        with contextlib.suppress(OSError):  # not to be trusted again: the next process rebuilds it
            (folder / f"{name}.sha256").unlink(missing_ok=True)
        raise


def _cache_home() -> Path:
    """``$STA_CACHE_HOME`` if set, else ``~/.cache/sta_cache``: the folder sta_cache keeps its artifacts in. Read
    here rather than imported, so that the kernels depend on nothing else in the package."""
    env = os.environ.get("STA_CACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sta_cache"


def _load() -> ctypes.CDLL:
    """Load the kernels from the cache folder, built there if needed. Where that folder cannot be used (not
    private, read-only, ...), build them in a fresh private temporary folder, removed once they are loaded."""
    compiler = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    if not compiler:
        raise CPUKernelUnavailable("no C compiler found (install gcc or set CC); use backend='torch' instead")
    torch.get_num_threads()  # make sure PyTorch's OpenMP runtime is loaded first, so the kernels share it
    name = _library_name(compiler)
    cache = _cache_home() / "kernels"
    try:
        return _load_from(cache, name, compiler)
    except OSError as error:
        reason = f"{cache} cannot be used: {error}"
    try:
        with tempfile.TemporaryDirectory(prefix="sta_cache-kernels-") as scratch:
            lib = _load_from(Path(scratch), name, compiler)
    except (OSError, CPUKernelUnavailable) as error:
        raise CPUKernelUnavailable(f"{reason}; in a temporary folder: {error}") from error
    warnings.warn(
        f"sta_cache: built the CPU kernels in a temporary folder, again in every process, because {reason}",
        RuntimeWarning,
        stacklevel=3,
    )
    return lib


_outcome: ctypes.CDLL | CPUKernelUnavailable | None = None
_outcome_lock = threading.Lock()  # one build at a time in this process


def library() -> ctypes.CDLL:
    """The compiled kernels, built on first use (about a second) and cached by source, compiler and CPU. Every
    failure is a CPUKernelUnavailable, and the outcome is kept for the process: a failed build is not tried again
    by each layer of each cache."""
    global _outcome
    with _outcome_lock:
        if _outcome is None:
            try:
                _outcome = _load()
            except CPUKernelUnavailable as error:
                _outcome = error
            except Exception as error:  # whatever went wrong (a full disk, ...): "auto" falls back on this type
                _outcome = CPUKernelUnavailable(f"building or loading the kernels failed: {error!r}")
                _outcome.__cause__ = error
        outcome = _outcome
    if isinstance(outcome, CPUKernelUnavailable):
        raise outcome.with_traceback(None)  # the same error each time, its traceback not growing with each raise
    return outcome


def reset() -> None:
    """Forget :func:`library`'s outcome, so that the next call loads or builds again (tests). Libraries already
    loaded stay loaded: ctypes cannot unload them safely."""
    global _outcome
    with _outcome_lock:
        _outcome = None


def _codes(
    indices: torch.Tensor, coefficients: torch.Tensor, k: int, index_bits: int, levels: torch.Tensor | None
) -> tuple[_Codes, list[torch.Tensor]]:
    """Describe ``[B, H, C, k]`` codes to C (``index_bits``: indices bit-packed; indices of last dim 0: slot j is
    atom j; ``levels``: coefficients as rows of a scale and packed level codes with these values, packing.py);
    returns the struct and the tensors it points into, which the caller keeps alive until the kernel has
    returned."""
    indices = indices.contiguous()
    if indices.shape[-1] == 0:
        index_kind = _IMPLICIT
    elif index_bits:
        if indices.dtype != torch.uint8:
            raise ValueError("packed indices must be uint8")
        index_kind = _PACKED
    elif indices.dtype in _INDEX_KINDS:
        index_kind = _INDEX_KINDS[indices.dtype]
    else:
        raise ValueError(f"unsupported index dtype {indices.dtype}")
    table, level_bits = None, 0
    if levels is not None:
        if coefficients.dtype != torch.uint8:
            raise ValueError("coefficient levels must be uint8 rows")
        level_bits = levels.numel().bit_length() - 1
        if levels.numel() != 1 << level_bits:
            raise ValueError(f"a level table has 2^bits values, got {levels.numel()}")
        coefficient_kind, table = _LEVELS, byte_float_table(LEVEL_SCALE_DTYPE)
        coefficients, levels = coefficients.contiguous(), levels.float().contiguous()
    elif coefficients.dtype in _COEFFICIENT_KINDS:
        coefficient_kind = _COEFFICIENT_KINDS[coefficients.dtype]
        coefficients = coefficients.contiguous()
    elif coefficients.dtype.itemsize == 1 and coefficients.dtype.is_floating_point:
        coefficient_kind, table = _TABLE8, byte_float_table(coefficients.dtype)
        coefficients = coefficients.contiguous().view(torch.uint8)
    else:
        coefficient_kind, coefficients = _COEFFICIENT_KINDS[torch.float32], coefficients.float().contiguous()
    codes = _Codes(
        indices.data_ptr(),
        coefficients.data_ptr(),
        table.data_ptr() if table is not None else None,
        levels.data_ptr() if levels is not None else None,
        coefficients.shape[2],
        k,
        index_kind,
        index_bits,
        indices.shape[-1],
        coefficient_kind,
        level_bits,
        coefficients.shape[-1],
    )
    return codes, [indices, coefficients, table, levels]


MAX_HEAD_DIM = 1024  # the C kernels' per-token key buffers


def fits(head_dim: int) -> bool:
    """The C kernels work in 8-float vectors on both halves of a rotated key, in fixed-size buffers."""
    return head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM


def _check(kv: CompressedKV) -> None:
    d = kv.key_atoms.shape[-1]
    if not fits(d):
        raise ValueError(f"the 'cpu' backend needs head_dim a multiple of 16 up to {MAX_HEAD_DIM}, got {d}")
    for name in ("key_atoms", "value_atoms", "key_indices", "value_indices"):
        if getattr(kv, name).device.type != "cpu":
            raise ValueError(f"the 'cpu' backend runs on CPU tensors; {name} is on {getattr(kv, name).device}")
    if kv.key_indices.shape[-1] == 0 and kv.num_compressed:
        raise ValueError("keys with no stored indices (slot j is atom j) are not served: only values code so")
    if kv.value_indices.shape[-1] == 0 and kv.value_atoms.shape[-2] != kv.k("value"):
        raise ValueError(
            f"values with no stored indices use atom j for slot j: {kv.k('value')} coefficients per value need "
            f"{kv.k('value')} atoms, the value dictionary has {kv.value_atoms.shape[-2]}"
        )


def omp_encode(
    x: torch.Tensor,
    atoms: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    eps: float = 1e-6,
    method: str = "auto",
    pursuit: str = "omp",
    correlation_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`reference.omp_encode_reference` with the same ``pursuit`` (same picks up to float rounding on
    near-ties), in C. ``x [M, d]`` -> ``(indices int64 [M, k], coefficients [M, k])``. Dictionaries whose N is not a
    multiple of 16 go to the reference.

    ``method="direct"`` correlates every residual with all N atoms at every step (N * d multiply-adds per step);
    ``"gram"`` correlates each vector with the atoms once (one matmul for all of them), forms the Gram matrix
    ``atoms atoms^T`` and updates the correlations from it (N * (step + 1) per step for OMP, N for MP, plus
    N^2 * d per call); ``"auto"`` picks ``"gram"`` when the call has enough vectors to amortise the Gram matrix.
    ``correlation_dtype`` is the Gram kernel's correlation matmul: ``torch.float32``, ``torch.bfloat16``, or None
    for :func:`bf16_correlations`' choice for this CPU."""
    n_atoms, d = atoms.shape
    if method not in ("auto", "direct", "gram"):
        raise ValueError(f"method must be 'auto', 'direct' or 'gram', got {method!r}")
    if pursuit not in PURSUITS:
        raise ValueError(f"pursuit must be one of {PURSUITS}, got {pursuit!r}")
    if not 1 <= k <= n_atoms:
        raise ValueError(f"k must be between 1 and the dictionary's {n_atoms} atoms, got {k}")
    if n_atoms % 16 or not fits(d) or x.device.type != "cpu":
        return omp_encode_reference(x, atoms, b_dec, k, eps, pursuit)
    if method == "auto":
        method = "gram" if x.shape[0] >= gram_threshold(n_atoms, d, k, pursuit) else "direct"
    m = x.shape[0]
    matching = int(pursuit == "mp")
    target = (x.float() - b_dec.float()).contiguous()
    atoms = atoms.float().contiguous()
    indices = torch.empty(m, k, dtype=torch.long)
    coefficients = torch.empty(m, k, dtype=torch.float32)
    if correlation_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"correlation_dtype must be torch.float32, torch.bfloat16 or None, got {correlation_dtype}")
    if method == "gram":
        bf16 = bf16_correlations() if correlation_dtype is None else correlation_dtype == torch.bfloat16
        correlations = target.bfloat16() @ atoms.T.bfloat16() if bf16 else target @ atoms.T
        gram = atoms @ atoms.T
        failed = library().sta_omp_encode_gram(
            target.data_ptr(),
            atoms.data_ptr(),
            correlations.data_ptr(),
            int(bf16),
            gram.data_ptr(),
            m,
            n_atoms,
            d,
            k,
            eps,
            matching,
            indices.data_ptr(),
            coefficients.data_ptr(),
            torch.get_num_threads(),
        )
    else:
        panels = atoms.view(n_atoms // 16, 16, d).transpose(1, 2).contiguous()  # [N / 16, d, 16]: see correlate()
        failed = library().sta_omp_encode(
            target.data_ptr(),
            atoms.data_ptr(),
            panels.data_ptr(),
            m,
            n_atoms,
            d,
            k,
            eps,
            matching,
            indices.data_ptr(),
            coefficients.data_ptr(),
            torch.get_num_threads(),
        )
    if failed:
        raise MemoryError("the OMP kernel could not allocate its scratch memory")
    return indices, coefficients.to(x.dtype)


def rotated_levels(
    rotated: torch.Tensor, norms: torch.Tensor, thresholds: torch.Tensor, codebook: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of rotated values in C, as ``rotated_values.RotatedValueCoder`` computes them in PyTorch:
    ``rotated [M, d]`` coordinates and their ``norms [M]`` -> ``uint8 [M, 1 + ceil(d * bits / 8)]`` rows whose
    byte 0 (the float8 scale) is left 0 for the caller and whose other bytes hold each coordinate's codebook cell
    bit-packed (``packing.pack_level_rows``' layout), and the float32 ``gains [M]``, sum(r q) / sum(q q) with ``q``
    the cells' codebook values. The cells equal PyTorch's exactly; a gain differs from its float32 sum only in the
    summation order."""
    m, d = rotated.shape
    if not fits(d):
        raise ValueError(f"the C kernels need head_dim a multiple of 16 up to {MAX_HEAD_DIM}, got {d}")
    if codebook.numel() != 1 << bits or thresholds.numel() != codebook.numel() - 1:
        raise ValueError(f"a {bits}-bit codebook has {1 << bits} values and {(1 << bits) - 1} thresholds")
    rotated, norms = rotated.float().contiguous(), norms.float().reshape(m).contiguous()
    thresholds, codebook = thresholds.float().contiguous(), codebook.float().contiguous()
    rows = torch.zeros(m, 1 + math.ceil(d * bits / 8), dtype=torch.uint8)
    gains = torch.empty(m, dtype=torch.float32)
    library().sta_rotated_encode(
        rotated.data_ptr(),
        norms.data_ptr(),
        thresholds.data_ptr(),
        thresholds.numel(),
        codebook.data_ptr(),
        bits,
        m,
        d,
        rows.data_ptr(),
        rows.shape[1],
        gains.data_ptr(),
        torch.get_num_threads(),
    )
    return rows, gains


@functools.cache
def bf16_correlations() -> bool:
    """Whether the Gram kernel's correlation matmul runs in bfloat16 by default: where the CPU has bfloat16 dot
    products (x86 ``avx512_bf16`` / ``amx_bf16``: the matmul then takes about a third of float32's time and the
    kernel reads half the bytes). Only the picks read the correlations; the coefficients stay exact float32 least
    squares (LAB_NOTES.md has what bfloat16 picks cost in perplexity)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(_cpu_flags()))


def gram_threshold(n_atoms: int, head_dim: int, k: int, pursuit: str = "omp") -> int:
    """Vectors per call from which the Gram kernel is faster than the direct one: per vector it saves about
    ``N * k * d`` multiply-adds less its own updates (``N * k * (k + 1) / 2`` for OMP, ``N * k`` for MP), and it
    pays ``N^2 * d`` per call for the Gram matrix."""
    updates = k * (k + 1) / 2 if pursuit == "omp" else k
    saved = k * head_dim - updates
    return max(1, math.ceil(n_atoms * head_dim / max(saved, 1.0)))


def sparse_attention(
    query: torch.Tensor, kv: CompressedKV, mask: torch.Tensor | None, scaling: float, softcap: float | None = None
) -> torch.Tensor:
    """:func:`reference.sparse_attention_reference` in one call of the C kernel ``sta_attention``: scores over
    sinks, codes and window, softmax, and the output, with the codes' values accumulated in atom space and
    multiplied by the value dictionary once."""
    _check(kv)
    b, hq, lq, d = query.shape
    h = kv.window_keys.shape[1]
    rows = hq // h * lq
    q = query.float().reshape(b, h, rows, d).contiguous()
    # what the struct points into, kept alive until the kernel has returned
    alive = {
        "queries": q,
        **{name: getattr(kv, name).float().contiguous() for name in _DENSE},
        "key_atoms": kv.key_atoms.float().contiguous(),
        "key_bias": kv.key_bias.float().contiguous(),
        "value_atoms": kv.value_atoms.float().contiguous(),
        "value_bias": kv.value_bias.float().contiguous(),
    }
    if mask is not None:
        alive["mask"] = mask.to(torch.uint8).contiguous()
    c = kv.num_compressed
    if c and kv.key_positions is None:  # post-RoPE codes: scores gathered from one q . D^T product per row
        alive["atom_scores"] = (q @ alive["key_atoms"].transpose(-1, -2).unsqueeze(0)).contiguous()
    elif c:
        positions = kv.key_positions.to(torch.int32).contiguous()
        lowest, highest = int(positions.min()), int(positions.max())
        if lowest >= 0:
            cos, sin = rope_table(highest + 1, kv.rope_inv_freq)
        else:  # angles of negative positions are computed directly, the table starting at the lowest one
            cos, sin = rope_cos_sin(torch.arange(lowest, highest + 1), kv.rope_inv_freq)
            positions = (positions - lowest).contiguous()
        alive.update(positions=positions, cos_table=cos.contiguous(), sin_table=sin.contiguous())
    key_codes, key_alive = _codes(kv.key_indices, kv.key_coefficients, kv.k("key"), kv.packed_index_bits, kv.key_levels)
    value_codes, value_alive = _codes(
        kv.value_indices, kv.value_coefficients, kv.k("value"), kv.packed_index_bits, kv.value_levels
    )
    attention = _Attention(
        *(alive[name].data_ptr() if name in alive else None for name in _ATTENTION_POINTERS),
        float(kv.rope_scaling),
        float(scaling),
        float(softcap or 0.0),
        b,
        h,
        rows,
        lq,
        d,
        kv.num_sinks,
        kv.num_window,
        *kv.key_atoms.shape[:2],
        *kv.value_atoms.shape[:2],
    )
    out = torch.empty(b, h, rows, d, dtype=torch.float32)
    failed = library().sta_attention(
        ctypes.byref(attention),
        ctypes.byref(key_codes),
        ctypes.byref(value_codes),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("the attention kernel could not allocate its scratch buffers")
    return out.view(b, hq, lq, d).to(query.dtype)
