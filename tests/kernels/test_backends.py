"""Every grouped-GEMM backend against the reference, output and gradients, on ragged inputs."""

import pytest
import torch

from moe.kernels import backends, ops, reference

CPU = torch.device("cpu")


def loop_gather_mm(x, rows, w, counts):
    """The plain loop every backend must equal: one row at a time."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    src = x if rows is None else x[rows]
    return torch.stack([src[a] @ w[expert_of_row[a]] for a in range(src.shape[0])]) if src.shape[0] else \
        x.new_zeros(0, w.shape[2])


# (counts per expert, K, N): empty experts, one row, E not a power of two, awkward widths.
CASES = [
    ([0, 0, 0], 8, 8),  # no rows at all (a rank that receives nothing under expert parallelism)
    ([3, 0, 5, 2], 8, 16),
    ([0, 0, 7], 12, 8),
    ([1], 4, 4),
    ([4, 4, 0, 0, 4], 100, 40),
    ([0, 6, 0, 1, 2, 0, 3], 24, 36),
]


def _inputs(counts, K, N, dtype, gather):
    counts = torch.tensor(counts)
    A, E = int(counts.sum()), len(counts)
    T = max(A // 2, 1) if gather else A
    x = torch.randn(T, K, dtype=dtype, requires_grad=True)
    rows = torch.randint(0, T, (A,)) if gather else None
    w = (torch.randn(E, K, N, dtype=dtype) / K**0.5).requires_grad_(True)
    return x, rows, w, counts


@pytest.mark.parametrize("counts,K,N", CASES)
@pytest.mark.parametrize("gather", [False, True])
def test_reference_equals_row_loop_float64(counts, K, N, gather):
    x, rows, w, counts = _inputs(counts, K, N, torch.float64, gather)
    y = ops.gather_grouped_mm(x, rows, w, counts, backend="reference")
    assert torch.allclose(y, loop_gather_mm(x, rows, w, counts), atol=1e-12)


def _compare(backend, counts, K, N, dtype, gather, atol, rtol):
    x, rows, w, counts = _inputs(counts, K, N, dtype, gather)
    ok, why = backends.backend_status(backend, CPU, dtype, K, N)
    if not ok:
        with pytest.raises(ValueError, match=f"expert backend '{backend}' cannot run here"):
            ops.gather_grouped_mm(x, rows, w, counts, backend=backend)
        return
    y = ops.gather_grouped_mm(x, rows, w, counts, backend=backend)
    assert y.dtype == dtype and y.shape == (int(counts.sum()), N)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    # ground truth in float64
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    y64 = reference.gather_grouped_mm(x64, rows if rows is not None else torch.arange(x64.shape[0]), w64, counts)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), g.double())
    for got, want, name in ((y, y64, "y"), (dx, dx64, "dx"), (dw, dw64, "dw")):
        assert torch.allclose(got.double(), want, atol=atol, rtol=rtol), (name, (got.double() - want).abs().max())
    if (counts == 0).any():  # experts without rows get an exact zero gradient
        assert torch.count_nonzero(dw[counts == 0]) == 0


@pytest.mark.parametrize("counts,K,N", CASES)
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 5e-2, 2e-2)])
def test_torch_backend_matches_reference(counts, K, N, gather, dtype, atol, rtol):
    _compare("torch", counts, K, N, dtype, gather, atol, rtol)


def test_torch_backend_refuses_unaligned_widths_with_reason():
    ok, why = backends.backend_status("torch", CPU, torch.bfloat16, 100, 40)
    assert not ok and "16 bytes" in why
    ok, why = backends.backend_status("torch", CPU, torch.float64, 8, 8)
    assert not ok and "float64" in why


def test_auto_picks_an_available_backend():
    w = torch.randn(3, 8, 8)
    assert backends.resolve_backend("auto", torch.randn(2, 8), w) == "torch"
    assert backends.resolve_backend("auto", torch.randn(2, 8, dtype=torch.float64), w.double()) == "reference"
    w_odd = torch.randn(3, 100, 40, dtype=torch.bfloat16)
    assert backends.resolve_backend("auto", torch.randn(2, 100, dtype=torch.bfloat16), w_odd) == "reference"


def test_unknown_and_unavailable_backends_are_clear_errors():
    x, w, counts = torch.randn(4, 8), torch.randn(2, 8, 8), torch.tensor([2, 2])
    with pytest.raises(ValueError, match="unknown expert backend 'fast'; valid: auto, reference, torch, triton"):
        ops.grouped_mm(x, w, counts, backend="fast")
    with pytest.raises(ValueError, match="megablocks runs on CUDA devices only"):
        ops.grouped_mm(x, w, counts, backend="megablocks")


def test_scatter_combine_equals_loop_and_accumulates_in_fp32():
    T, D = 6, 5
    rows = torch.tensor([0, 2, 2, 5, 0, 3])
    weight = torch.rand(6)
    y = torch.randn(6, D, dtype=torch.float64)
    out = reference.scatter_combine(y, rows, weight, T)
    want = torch.zeros(T, D, dtype=torch.float64)
    for a in range(6):
        want[rows[a]] += weight[a].double() * y[a]
    assert torch.allclose(out, want.to(out.dtype), atol=1e-6)
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[4]) == 0
    # bf16 inputs: the sum happens in fp32, so it equals the fp32 sum rounded once
    yb = y.to(torch.bfloat16)
    outb = reference.scatter_combine(yb, rows, weight, T)
    assert torch.equal(outb, reference.scatter_combine(yb.float(), rows, weight, T).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "megablocks"])
def test_gpu_backends_match_reference_bf16(backend):
    counts = torch.tensor([5, 0, 17, 3], device="cuda")
    x = torch.randn(25, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ok, why = backends.backend_status(backend, x.device, x.dtype, 64, 128)
    if not ok:
        pytest.skip(why)
    y = ops.grouped_mm(x, w, counts, backend=backend)
    y_ref = ops.grouped_mm(x.float(), w.float(), counts, backend="reference")
    assert torch.allclose(y.float(), y_ref, atol=5e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_backend_runs_every_dtype_it_claims_with_every_gradient(backend, dtype, tol):
    """Where ``backend_status`` says a backend runs a dtype on this GPU (torch's grouped_mm: every dtype once
    ``torch.nn.functional.grouped_mm`` exists, bf16 only before), it runs: output and both gradients vs the
    float64 reference, relative to each tensor's norm; an empty expert included."""
    ok, why = backends.backend_status(backend, torch.device("cuda"), dtype, 64, 128)
    if not ok:
        pytest.skip(why)
    counts = torch.tensor([5, 0, 17, 3], device="cuda")
    x = torch.randn(25, 64, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(4, 64, 128, device="cuda") / 8).to(dtype).requires_grad_()
    g = torch.randn(25, 128, device="cuda").to(dtype)
    got = [ops.grouped_mm(x, w, counts, backend=backend)]
    got += torch.autograd.grad(got[0], (x, w), g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = [ops.grouped_mm(x64, w64, counts, backend="reference")]
    want += torch.autograd.grad(want[0], (x64, w64), g.double())
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert a.dtype == dtype
        err = (a.double() - b).norm() / b.norm()
        assert err < tol, (name, err.item())
