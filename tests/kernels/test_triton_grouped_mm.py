"""Triton gather-grouped-GEMM against a per-expert loop (float64) and ``moe.kernels.reference``: the output
and both gradients, at awkward sizes. On CPU the kernels run under the Triton interpreter.

Shape legend: T tokens, A assignments (rows grouped by expert), E experts, K input width, N output width.
"""

import os

import torch

# NOTE: triton.jit picks interpreter vs GPU when it decorates, i.e. when moe.kernels.triton_grouped_mm is
# imported, so the variable must be set before that import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from moe.kernels import reference  # noqa: E402
from moe.kernels import triton_grouped_mm as tgm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
AVAILABLE, REASON = tgm.is_available(DEVICE)
needs_triton = pytest.mark.skipif(not AVAILABLE, reason=REASON)


def loop_gather_grouped_mm(x_TK, rows_A, w_EKN, counts_E):
    """The plain definition: gather, then one matmul per expert over its slice of rows."""
    x_AK = x_TK if rows_A is None else x_TK[rows_A]
    outs, start = [], 0
    for e, count in enumerate(counts_E.tolist()):
        outs.append(x_AK[start : start + count] @ w_EKN[e])
        start += count
    return torch.cat(outs, dim=0)


def top2_rows(T: int, E: int, skip_expert: int | None, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token picks 2 distinct experts (never ``skip_expert``); assignments sorted by expert, so
    every token appears twice in rows_A. Returns rows_A (2T,) and counts_E (E,)."""
    allowed_E = torch.tensor([e for e in range(E) if e != skip_expert])
    pick_T2 = torch.stack([torch.randperm(len(allowed_E), generator=gen)[:2] for _ in range(T)])
    expert_A = allowed_E[pick_T2].flatten()
    token_A = torch.arange(T).repeat_interleave(2)
    order_A = torch.argsort(expert_A, stable=True)
    return token_A[order_A], torch.bincount(expert_A, minlength=E)


def make_case(name: str, gen: torch.Generator):
    """Returns T, K, N, rows_A (or None), counts_E for a named ragged layout."""
    if name == "zero_expert_middle":  # identity rows; expert 1 empty; expert 2 spans several row blocks
        return 39, 24, 40, None, torch.tensor([5, 0, 34])
    if name == "all_rows_one_expert":
        rows_A = torch.randint(0, 20, (33,), generator=gen)
        return 20, 24, 40, rows_A, torch.tensor([0, 0, 33, 0])
    if name == "last_expert_empty":  # E = 5, K = 100
        rows_A = torch.randint(0, 30, (32,), generator=gen)
        return 30, 100, 40, rows_A, torch.tensor([7, 3, 20, 2, 0])
    if name == "single_row":
        return 1, 24, 40, torch.tensor([0]), torch.tensor([0, 1, 0])
    if name == "top2_repeated_tokens":  # every token used twice; expert 1 never chosen
        rows_A, counts_E = top2_rows(T=24, E=5, skip_expert=1, gen=gen)
        return 24, 100, 40, rows_A, counts_E
    if name == "grouped_identity_multiblock":  # rows_A None with A = 64, every expert over 16 rows
        return 64, 100, 40, None, torch.tensor([17, 33, 14])
    raise KeyError(name)


CASES = [
    "zero_expert_middle",
    "all_rows_one_expert",
    "last_expert_empty",
    "single_row",
    "top2_repeated_tokens",
    "grouped_identity_multiblock",
]
# Each element may differ from the float64 result by one rounding of the fp32 accumulator to the output
# dtype, to nearest as the GPU rounds: half a unit in the last place, at most 2^-8 of the value in bf16 and
# 2^-11 in fp16 (truncation would cost up to 2^-7 and 2^-10: test_bf16_tolerance_rejects_truncation), plus
# the fp32 accumulation's error, 1e-5 of the reference's largest magnitude.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}
ACCUMULATION = 1e-5


def assert_close_to(actual: torch.Tensor, expected_f64: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.dtype == dtype, (what, actual.dtype)
    atol = ACCUMULATION * max(expected_f64.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual.double(), expected_f64, rtol=RTOL[dtype], atol=atol,
                               msg=lambda m: f"{what}: {m}")


def truncate_to_bf16(x_f32: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by dropping the low 16 bits (what Triton's interpreter does for ``.to(tl.bfloat16)``)."""
    return (x_f32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def run_case(name: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    T, K, N, rows_A, counts_E = make_case(name, gen)
    E = counts_E.numel()
    x_TK = torch.randn(T, K, generator=gen).to(dtype)
    w_EKN = (torch.randn(E, K, N, generator=gen) / K**0.5).to(dtype)
    dy_AN = torch.randn(counts_E.sum().item(), N, generator=gen).to(dtype)

    # float64 ground truth from the same (already rounded) inputs, by the loop and by moe.kernels.reference.
    x64 = x_TK.double().requires_grad_()
    w64 = w_EKN.double().requires_grad_()
    y64 = loop_gather_grouped_mm(x64, rows_A, w64, counts_E)
    y64.backward(dy_AN.double())
    if rows_A is None:
        y_ref = reference.grouped_mm(x64.detach(), w64.detach(), counts_E)
    else:
        y_ref = reference.gather_grouped_mm(x64.detach(), rows_A, w64.detach(), counts_E)
    torch.testing.assert_close(y_ref, y64.detach(), rtol=1e-12, atol=1e-12)

    x = x_TK.to(DEVICE).requires_grad_()
    w = w_EKN.to(DEVICE).requires_grad_()
    rows = None if rows_A is None else rows_A.to(DEVICE)
    y = tgm.gather_grouped_mm(x, rows, w, counts_E.to(DEVICE))
    y.backward(dy_AN.to(DEVICE))

    assert_close_to(y.cpu(), y64.detach(), dtype, "y")
    assert_close_to(x.grad.cpu(), x64.grad, dtype, "dx")
    assert_close_to(w.grad.cpu(), w64.grad, dtype, "dw")
    empty_E = counts_E == 0
    assert torch.all(w.grad.cpu()[empty_E] == 0), "experts with no rows must get an exact zero dw"


@needs_triton
@pytest.mark.parametrize("name", CASES)
def test_float32_matches_loop_and_reference(name: str) -> None:
    run_case(name, torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", CASES)
def test_half_precision_matches_float64_loop(name: str, dtype: torch.dtype) -> None:
    run_case(name, dtype)


def test_bf16_tolerance_rejects_truncation() -> None:
    """The bf16 bound above fails a result truncated instead of rounded, so the interpreter tests would catch
    a store that truncates (the GPU rounds to nearest even)."""
    gen = torch.Generator().manual_seed(3)
    exact = torch.randn(64, 40, generator=gen, dtype=torch.float64)
    assert_close_to(exact.float().to(torch.bfloat16), exact, torch.bfloat16, "rounded")
    with pytest.raises(AssertionError):
        assert_close_to(truncate_to_bf16(exact.float()), exact, torch.bfloat16, "truncated")


@needs_triton
def test_bf16_outputs_are_the_fp32_result_rounded_to_nearest() -> None:
    """y and dw in bf16 equal torch's round-to-nearest of the exact result. Integer inputs below 256 are exact
    in bf16 and every sum here stays below 2^24, so fp32 accumulates exactly in any order and the only
    difference left is the final rounding."""
    gen = torch.Generator().manual_seed(4)
    counts_E = torch.tensor([5, 0, 27])
    x_AK = torch.randint(-255, 256, (32, 16), generator=gen).to(torch.bfloat16)
    w_EKN = torch.randint(-255, 256, (3, 16, 48), generator=gen).to(torch.bfloat16)
    dy_AN = torch.randint(-255, 256, (32, 48), generator=gen).to(torch.bfloat16)
    w = w_EKN.to(DEVICE).requires_grad_()
    y = tgm.grouped_mm(x_AK.to(DEVICE), w, counts_E)
    y.backward(dy_AN.to(DEVICE))
    w32 = w_EKN.float().detach().requires_grad_()
    y32 = reference.grouped_mm(x_AK.float(), w32, counts_E)
    y32.backward(dy_AN.float())
    for got, exact, what in ((y.detach().cpu(), y32.detach(), "y"), (w.grad.cpu(), w32.grad, "dw")):
        assert torch.equal(got, exact.to(torch.bfloat16)), what
        assert not torch.equal(got, truncate_to_bf16(exact)), f"{what}: the check must tell rounding from truncation"


@needs_triton
def test_grouped_mm_is_identity_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    counts_E = torch.tensor([3, 0, 18])
    x_AK = torch.randn(21, 24, generator=gen).to(DEVICE)
    w_EKN = torch.randn(3, 24, 40, generator=gen).to(DEVICE)
    y_AN = tgm.grouped_mm(x_AK, w_EKN, counts_E)
    expected = reference.grouped_mm(x_AK.double(), w_EKN.double(), counts_E)
    assert_close_to(y_AN.cpu(), expected.cpu(), torch.float32, "y")


@needs_triton
def test_strided_inputs_and_weight_only_gradient() -> None:
    """Non-contiguous x and a transposed weight view go through by strides; x needs no gradient."""
    gen = torch.Generator().manual_seed(1)
    counts_E = torch.tensor([9, 0, 20])
    rows_A = torch.randint(0, 15, (29,), generator=gen)
    x_TK = torch.randn(15, 48, generator=gen)[:, ::2]  # (15, 24), column stride 2
    w_ENK = torch.randn(3, 40, 24, generator=gen)
    dy_AN = torch.randn(29, 40, generator=gen)

    w64_ENK = w_ENK.double().requires_grad_()
    y64 = loop_gather_grouped_mm(x_TK.double(), rows_A, w64_ENK.transpose(1, 2), counts_E)
    y64.backward(dy_AN.double())

    w = w_ENK.to(DEVICE).requires_grad_()
    y = tgm.gather_grouped_mm(x_TK.to(DEVICE), rows_A.to(DEVICE), w.transpose(1, 2), counts_E)
    y.backward(dy_AN.to(DEVICE))
    assert_close_to(y.cpu(), y64.detach(), torch.float32, "y")
    assert_close_to(w.grad.cpu(), w64_ENK.grad, torch.float32, "dw")


def test_float64_is_rejected_with_supported_dtypes_named() -> None:
    x_TK = torch.randn(4, 16, dtype=torch.float64)
    w_EKN = torch.randn(2, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"float64.*float32, bfloat16, float16"):
        tgm.gather_grouped_mm(x_TK, None, w_EKN, torch.tensor([2, 2]))


@pytest.mark.parametrize(
    "x_shape, w_shape, rows_A, counts_E, match",
    [
        ((4, 16, 1), (2, 16, 8), None, [2, 2], "2-D"),
        ((4, 16), (16, 8), None, [2, 2], "3-D"),
        ((4, 16), (2, 12, 8), None, [2, 2], "must equal w_EKN.shape"),
        ((4, 16), (2, 16, 8), None, [2, 1, 1], r"shape \(2,\)"),
        ((4, 16), (2, 16, 8), None, [2, 1], "sum to x_TK.shape"),
        ((4, 16), (2, 16, 8), [0, 1, 2], [2, 2], "sum to len\\(rows_A\\)"),
        ((4, 16), (2, 16, 8), [0, 1, 2, 4], [2, 2], r"\[0, 4\)"),
        ((4, 16), (2, 16, 8), None, [5, -1], "non-negative"),
    ],
)
def test_bad_inputs_raise_value_error(x_shape, w_shape, rows_A, counts_E, match) -> None:
    x_TK = torch.randn(*x_shape).to(DEVICE)
    w_EKN = torch.randn(*w_shape).to(DEVICE)
    rows = None if rows_A is None else torch.tensor(rows_A, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        tgm.gather_grouped_mm(x_TK, rows, w_EKN, torch.tensor(counts_E))


def test_is_available_on_cpu_needs_interpreter(monkeypatch) -> None:
    import triton  # noqa: F401  (an install requirement on Linux: a missing one fails, it does not skip)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = tgm.is_available(torch.device("cpu"))
    assert not ok
    assert "TRITON_INTERPRET=1" in reason


# 64-bit offsets. Strided views into one buffer of 2^32 + a few bf16 elements (8 GiB of address space; only the
# pages written or read are ever touched) put a block index times a stride past 2^31 elements, where int32
# arithmetic wraps: views start at element 2^31, so the wrapped address (2^31 lower) still lies inside the
# buffer and a wrapping kernel reads or writes the wrong place instead of crashing.
BIG_BASE = 2**31
BIG_STRIDE = 2**30  # below 2^31, so Triton passes it as int32; twice it is not


@pytest.fixture(scope="module")
def big_buffer() -> torch.Tensor:
    return torch.empty(BIG_BASE + 2 * BIG_STRIDE + 4096, dtype=torch.bfloat16)


@needs_triton
def test_weight_gradient_offsets_are_64_bit(big_buffer) -> None:
    """The dw kernel writes expert e at e * stride_dwe: past 2^31 for e = 2 here (it wrapped in int32)."""
    if DEVICE.type != "cpu":
        pytest.skip("the 8 GiB strided view is an interpreter test")
    E, K, N, M = 3, 16, 32, 8
    dw = big_buffer.as_strided((E, K, N), (BIG_STRIDE, N, 1), storage_offset=BIG_BASE)
    dw.fill_(7.0)
    wrapped = big_buffer[BIG_BASE + 2 * BIG_STRIDE - 2**32:][: K * N]  # where e = 2 lands if it wraps
    wrapped.zero_()
    gen = torch.Generator().manual_seed(5)
    x_AK = torch.randn(E * M, K, generator=gen).to(torch.bfloat16)
    dy_AN = torch.randn(E * M, N, generator=gen).to(torch.bfloat16)
    offsets_E1 = torch.arange(E + 1) * M
    tile = tgm.triton_tiles.INTERPRETER["dw"]
    tgm._gather_mm_dw_kernel[(E, 1, 1)](
        x_AK, x_AK, dy_AN, dw, offsets_E1, N, K, x_AK.stride(0), x_AK.stride(1), dy_AN.stride(0), dy_AN.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2), HAS_ROWS=False, UPCAST=True, PRECISION="ieee",
        BLOCK_M=tile.block_m, BLOCK_N=N, BLOCK_K=K)
    for e in range(E):
        rows = slice(e * M, (e + 1) * M)
        exact = x_AK[rows].double().T @ dy_AN[rows].double()
        assert_close_to(dw[e].clone(), exact, torch.bfloat16, f"dw[{e}]")
    assert torch.count_nonzero(wrapped) == 0, "expert 2's gradient was written 2^32 elements too low"


@needs_triton
def test_forward_column_offsets_are_64_bit(big_buffer) -> None:
    """A weight view whose column stride is 2^30: column 2 sits 2^31 elements in, through the public wrapper."""
    if DEVICE.type != "cpu":
        pytest.skip("the 8 GiB strided view is an interpreter test")
    K, N = 16, 3
    w_EKN = big_buffer.as_strided((1, K, N), (K, 1, BIG_STRIDE), storage_offset=BIG_BASE)
    gen = torch.Generator().manual_seed(6)
    for n in range(N):
        w_EKN[0, :, n] = torch.randn(K, generator=gen).to(torch.bfloat16)
    big_buffer[BIG_BASE + 2 * BIG_STRIDE - 2**32:][:K].fill_(100.0)  # what a wrapped column 2 would read
    x_AK = torch.randn(20, K, generator=gen).to(torch.bfloat16)
    y = tgm.grouped_mm(x_AK, w_EKN, torch.tensor([20]))
    assert_close_to(y, x_AK.double() @ w_EKN[0].double(), torch.bfloat16, "y")
