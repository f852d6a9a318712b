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
# rtol on each element, plus atol as that fraction of the reference's largest magnitude. fp32 accumulates
# exactly as torch would; bf16/fp16 pay one rounding of the fp32 result (2^-8 / 2^-11 relative).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_close_to(actual: torch.Tensor, expected_f64: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.dtype == dtype, (what, actual.dtype)
    tol = TOLERANCE[dtype]
    atol = tol * max(expected_f64.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual.double(), expected_f64, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


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
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = tgm.is_available(torch.device("cpu"))
    assert not ok
    assert "TRITON_INTERPRET=1" in reason
