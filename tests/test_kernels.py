"""Triton kernels vs their PyTorch references, on the CPU under the Triton interpreter.

Inputs are fresh random tensors (never zeros). Outputs the kernels allocate are NaN / -1 poisoned and their
scratch is NaN-poisoned off CUDA, so an element nobody wrote fails the finiteness and range checks. Tolerance:
relative L2 error < 1e-4 in float32, < 1e-2 in float16 / bfloat16.
"""

import functools
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything below imports triton

import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(tl.zeros, InterpretedFunction):
    raise RuntimeError(
        "triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py imports transformers models, "
        "which import triton), so its kernels cannot run on the CPU here. Set TRITON_INTERPRET=1 in the "
        "environment, or at the top of tests/conftest.py before any other import."
    )

from kernel_cases import (  # noqa: E402
    ATTENTION_CASES,
    BF16,
    F16,
    F32,
    TOL,
    check_indices,
    check_omp_codes,
    decode_rows,
    gen,
    make_cache,
    make_mask,
    randn,
    rel_err,
    unit_atoms,
)
from sta_cache.kernels import (  # noqa: E402
    cpu_kernels,
    dispatch,  # noqa: E402
    reference,
    triton_attention,
    triton_encode,
)

# ------------------------------------------------------------------------------------------------------ Top-K


@pytest.mark.parametrize(
    "m, d, n, k, dtype, splits",
    [
        (7, 64, 256, 1, F32, None),
        (33, 64, 300, 8, F16, 2),
        (5, 128, 1000, 16, BF16, 3),
        (3, 256, 512, 64, F32, 2),
        (18, 128, 777, 13, F32, 1),
        (2, 128, 16384, 8, F32, None),
        (2, 64, 16384, 32, BF16, 5),
    ],
)
def test_topk_encode(m: int, d: int, n: int, k: int, dtype: torch.dtype, splits: int | None) -> None:
    g = gen(m * n + k)
    x, W_enc = randn(g, m, d, dtype=dtype), randn(g, d, n, scale=d**-0.5, dtype=dtype)
    b_enc, b_dec = randn(g, n, scale=0.1, dtype=dtype), randn(g, d, scale=0.1, dtype=dtype)
    indices, values = triton_encode.topk_encode(x, W_enc, b_enc, b_dec, k, num_splits=splits)
    assert indices.shape == values.shape == (m, k) and values.dtype == dtype
    check_indices(indices, n)
    # The kernel computes in float32; so does the reference on float32 copies of the same (rounded) inputs.
    args = [t.float() for t in (x, W_enc, b_enc, b_dec)]
    ref_indices, ref_values = reference.topk_encode_reference(*args, k)
    pre = (args[0] - args[3]) @ args[1] + args[2]
    kth = ref_values.min(dim=-1).values  # pre-ReLU k-th largest pre-activation
    chosen = pre.gather(1, indices)
    scale = pre.abs().max()
    assert (chosen >= kth[:, None] - 1e-5 * scale).all(), "a chosen atom is not among the k largest"
    assert rel_err(values, chosen.relu()) < TOL[dtype]
    W_dec = unit_atoms(g, n, d)
    assert rel_err(decode_rows(indices, values, W_dec), decode_rows(ref_indices, ref_values.relu(), W_dec)) < TOL[dtype]
    if dtype == F32:
        assert torch.equal(indices, ref_indices)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_topk_encode_separated_indices(dtype: torch.dtype) -> None:
    """Pre-activations dominated by distinct encoder biases: the reference's index list, in order, exactly."""
    g = gen(1)
    m, d, n, k = 20, 64, 512, 24
    x, W_enc = randn(g, m, d, dtype=dtype), randn(g, d, n, scale=1e-3, dtype=dtype)
    b_enc = (torch.randperm(n, generator=g).float() * 0.25).to(dtype)
    b_dec = randn(g, d, scale=0.1, dtype=dtype)
    indices, values = triton_encode.topk_encode(x, W_enc, b_enc, b_dec, k, num_splits=3)
    ref_indices, ref_values = reference.topk_encode_reference(*(t.float() for t in (x, W_enc, b_enc, b_dec)), k)
    assert torch.equal(indices, ref_indices)
    assert rel_err(values, ref_values) < TOL[dtype]


# ---------------------------------------------------------------------------------------------------------- OMP

# The Triton kernel and both C kernels of the "cpu" backend (which take N a multiple of 16, else the reference):
# "direct" correlates with every atom at every step, "gram" updates the correlations through the Gram matrix
# (from float32 correlations here; bfloat16 ones are tested on their own below). Each in both pursuits: the tests
# run the reference with the kernel's own ``pursuit``.
OMP_KERNELS = pytest.mark.parametrize(
    "omp_encode",
    [
        functools.partial(kernel, pursuit=pursuit)
        for pursuit in ("omp", "mp")
        for kernel in (
            triton_encode.omp_encode,
            functools.partial(cpu_kernels.omp_encode, method="direct"),
            functools.partial(cpu_kernels.omp_encode, method="gram", correlation_dtype=torch.float32),
        )
    ],
    ids=[f"{kernel}-{pursuit}" for pursuit in ("omp", "mp") for kernel in ("triton", "cpu-direct", "cpu-gram")],
)


def reference_of(omp_encode):
    """The reference with the pursuit the kernel under test uses."""
    return functools.partial(reference.omp_encode_reference, pursuit=omp_encode.keywords["pursuit"])


@OMP_KERNELS
@pytest.mark.parametrize("d, n, k, dtype", [(64, 256, 4, F32), (128, 1024, 8, F16), (256, 512, 16, F32)])
def test_omp_recovers_sparse_codes(omp_encode, d: int, n: int, k: int, dtype: torch.dtype) -> None:
    """Exactly k-sparse inputs with well-separated coefficients: the reference's indices, in order, and its
    coefficients."""
    g = gen(d + k)
    m = 6
    atoms, b_dec = unit_atoms(g, n, d, dtype), randn(g, d, scale=0.1, dtype=dtype)
    support = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(m)])
    magnitude = torch.linspace(3.0, 1.0, k) * torch.where(torch.rand(m, k, generator=g) < 0.5, -1.0, 1.0)
    x = (decode_rows(support, magnitude, atoms.float()) + b_dec.float()).to(dtype)
    indices, coefficients = omp_encode(x, atoms, b_dec, k)
    ref_indices, ref_coefficients = reference_of(omp_encode)(x, atoms, b_dec, k)
    assert coefficients.dtype == dtype
    assert torch.equal(indices, ref_indices)
    assert torch.equal(indices.sort(-1).values, support.sort(-1).values)
    assert rel_err(coefficients, ref_coefficients) < TOL[dtype]


@OMP_KERNELS
def test_omp_never_repeats_an_atom(omp_encode) -> None:
    """Inputs in the span of 3 atoms with k = 6: once the residual is ~0 a chosen atom can have the largest
    |correlation|, which sends the kernel through its exclusion pass."""
    g = gen(3)
    atoms, b_dec = unit_atoms(g, 208, 64), randn(g, 64, scale=0.1)
    support = torch.stack([torch.randperm(208, generator=g)[:3] for _ in range(5)])
    target = decode_rows(support, randn(g, 5, 3).abs() + 1, atoms)
    indices, coefficients = omp_encode(target + b_dec, atoms, b_dec, 6)
    ref_indices, _ = reference_of(omp_encode)(target + b_dec, atoms, b_dec, 6)
    check_indices(indices, 208)
    assert torch.equal(indices[:, :3], ref_indices[:, :3])
    assert rel_err(decode_rows(indices, coefficients, atoms), target) < 1e-4


@OMP_KERNELS
@pytest.mark.parametrize(
    "m, d, n, k, dtype",
    [
        (5, 64, 256, 1, F32),
        (17, 128, 1000, 16, F32),
        (3, 64, 512, 64, F32),
        (4, 256, 512, 32, BF16),
        (2, 128, 16384, 3, F16),
        (37, 64, 1024, 8, F32),  # the shipped dictionaries' shape, groups of 8 vectors and a remainder
        (21, 64, 1024, 16, F16),
    ],
)
def test_omp_encode_random(omp_encode, m: int, d: int, n: int, k: int, dtype: torch.dtype) -> None:
    """Dense random inputs, checked by :func:`check_omp_codes`."""
    g = gen(m + n + k)
    atoms, b_dec = unit_atoms(g, n, d, dtype), randn(g, d, scale=0.1, dtype=dtype)
    x = randn(g, m, d, dtype=dtype)
    indices, coefficients = omp_encode(x, atoms, b_dec, k)
    # The reference rounds x - b_dec to x's dtype before going to float32; the kernel subtracts in float32. In
    # half precision that rounding alone can flip a greedy pick, so the reference runs on float32 copies.
    ref_indices, ref_coefficients = reference_of(omp_encode)(x.float(), atoms.float(), b_dec.float(), k)
    assert indices.shape == coefficients.shape == (m, k) and coefficients.dtype == dtype
    check_omp_codes(indices, coefficients, ref_indices, ref_coefficients, x, atoms, b_dec, TOL[dtype])


@pytest.mark.parametrize(
    "correlation_dtype, row_spread, same_start", [(torch.float32, 0.05, 0.95), (torch.bfloat16, 0.1, 0.75)]
)
def test_omp_gram_codes_are_as_good_as_the_reference_on_a_coherent_dictionary(
    correlation_dtype, row_spread, same_start
) -> None:
    """The shipped dictionaries' shape with atoms far from orthogonal (shared components): the Gram kernel's updated
    (half-precision) correlations break near-ties differently from fresh ones in some rows, late in the pursuit,
    so each row's residual may differ a little either way, but no more, and not on average. Correlations from a
    bfloat16 matmul (the default where the CPU has bfloat16 dot products) break more ties, even among the first
    picks (``same_start``: rows whose first 4 picks are the reference's), and are no worse on average."""
    g = gen(11)
    common = randn(g, 8, 64)
    atoms = torch.nn.functional.normalize(randn(g, 1024, 8) @ common + 0.5 * randn(g, 1024, 64), dim=-1)
    b_dec = randn(g, 64, scale=0.1)
    x = randn(g, 300, 8) @ common + randn(g, 300, 64)
    target = x - b_dec
    ref_indices, ref_coefficients = reference.omp_encode_reference(x, atoms, b_dec, 16)
    indices, coefficients = cpu_kernels.omp_encode(
        x, atoms, b_dec, 16, method="gram", correlation_dtype=correlation_dtype
    )
    check_indices(indices, 1024)
    residual = (target - decode_rows(indices, coefficients, atoms)).norm(dim=-1)
    ref_residual = (target - decode_rows(ref_indices, ref_coefficients, atoms)).norm(dim=-1)
    assert ((residual - ref_residual).abs() / target.norm(dim=-1)).max() < row_spread
    assert abs(residual.mean() / ref_residual.mean() - 1) < 2e-3
    assert (indices[:, :4] == ref_indices[:, :4]).all(-1).float().mean() > same_start
    lstsq = torch.linalg.lstsq(atoms[indices].transpose(1, 2), target.unsqueeze(-1)).solution.squeeze(-1)
    assert rel_err(coefficients, lstsq) < 1e-3


@pytest.mark.parametrize("pursuit", ["omp", "mp"])
def test_omp_gram_gives_a_duplicate_atom_no_coefficient(pursuit: str) -> None:
    """k = N with one atom twice: the copy adds no direction, so its coefficient is 0, as in the reference, and the
    others are the least-squares fit. The Gram kernel sees the copy's new direction only as 1 minus its squared
    overlaps, float32 rounding (~1e-7) rather than the reference's ~1e-8 norm: taken for a direction, that noise
    would give both copies huge coefficients of opposite sign."""
    g = gen(5)
    atoms = unit_atoms(g, 16, 64)
    atoms[9] = atoms[2]
    x, b_dec = randn(g, 20, 64), randn(g, 64, scale=0.1)
    indices, coefficients = cpu_kernels.omp_encode(
        x, atoms, b_dec, 16, method="gram", pursuit=pursuit, correlation_dtype=torch.float32
    )
    ref_indices, ref_coefficients = reference.omp_encode_reference(x, atoms, b_dec, 16, pursuit=pursuit)
    check_indices(indices, 16)
    copies = (indices == 2) | (indices == 9)
    assert (copies.sum(-1) == 2).all()
    later_copy = copies & (copies.cumsum(-1) == 2)
    assert (coefficients[later_copy] == 0).all()
    assert rel_err(decode_rows(indices, coefficients, atoms), decode_rows(ref_indices, ref_coefficients, atoms)) < 1e-5


def test_omp_auto_uses_the_gram_kernel_for_many_vectors(monkeypatch) -> None:
    calls = []
    library = cpu_kernels.library()
    monkeypatch.setattr(
        cpu_kernels,
        "library",
        lambda: type(
            "Spy",
            (),
            {
                "sta_omp_encode": lambda self, *a: calls.append("direct") or library.sta_omp_encode(*a),
                "sta_omp_encode_gram": lambda self, *a: calls.append("gram") or library.sta_omp_encode_gram(*a),
            },
        )(),
    )
    g = gen(5)
    atoms, b_dec = unit_atoms(g, 1024, 64), randn(g, 64, scale=0.1)
    threshold = cpu_kernels.gram_threshold(1024, 64, 16)
    for m in (threshold - 1, threshold):
        cpu_kernels.omp_encode(randn(g, m, 64), atoms, b_dec, 16)
    assert calls == ["direct", "gram"]


@pytest.mark.parametrize(
    "k, method, correlation_dtype",
    [(0, "auto", None), (1025, "gram", None), (4, "fast", None), (4, "gram", torch.float16)],
)
def test_omp_encode_rejects_bad_arguments(k: int, method: str, correlation_dtype) -> None:
    g = gen(1)
    with pytest.raises(ValueError, match="method must be|k must be between|correlation_dtype must be"):
        cpu_kernels.omp_encode(
            randn(g, 3, 64),
            unit_atoms(g, 1024, 64),
            randn(g, 64),
            k,
            method=method,
            correlation_dtype=correlation_dtype,
        )


# ----------------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_sparse_attention(case: str) -> None:
    b, hkv, groups, lq, d, s, c, w, n, k_key, k_value, hd, dtype, pre_rope, mask_kind, softcap, chunk = ATTENTION_CASES[
        case
    ]
    g = gen(sum(map(ord, case)))
    kv = make_cache(g, b, hkv, d, s, c, w, n, k_key, k_value, hd, dtype, pre_rope)
    query = randn(g, b, hkv * groups, lq, d, dtype=dtype)
    mask = make_mask(mask_kind, b, lq, kv.length)
    out = triton_attention.sparse_attention(query, kv, mask, d**-0.5, softcap, chunk_tokens=chunk)
    ref = reference.sparse_attention_reference(query, kv, mask, d**-0.5, softcap)
    assert out.shape == query.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    if mask_kind == "empty":
        assert (out[-1, :, lq - 1] == 0).all(), "a row that sees nothing must be zeros"


def test_dispatcher_routes_to_triton() -> None:
    g = gen(7)
    d, n, k = 64, 256, 8
    sae = {
        "W_enc": randn(g, d, n, scale=d**-0.5),
        "b_enc": randn(g, n, scale=0.1),
        "W_dec": unit_atoms(g, n, d),
        "b_dec": randn(g, d, scale=0.1),
    }
    x = randn(g, 9, d)
    for encoder in ("topk", "omp"):
        got = dispatch.encode(x, sae, k, encoder, "triton")
        want = dispatch.encode(x, sae, k, encoder, "torch")
        assert torch.equal(got[0], want[0]) and rel_err(got[1], want[1]) < 1e-4
    kv = make_cache(g, 1, 2, d, 2, 40, 5, n, 4, 8, 1, F32, False)
    query = randn(g, 1, 4, 1, d)
    got = dispatch.sparse_attention(query, kv, None, 0.125, None, "triton")
    assert rel_err(got, dispatch.sparse_attention(query, kv, None, 0.125, None, "torch")) < 1e-4
