"""The Triton grouped GEMM on a real GPU (``pytest -m gpu``; tools/gpu_check.sh runs it on the lent machines):
bf16 against the fp32 reference with every gradient, the MMA instruction of the kernels that actually ran, and
the 64-bit weight-gradient offsets on a tensor past 2^31 elements.

Shape legend: T tokens, D model width, F expert width, E experts, k top-k, A assignments, K/N GEMM widths.
"""

import pytest
import torch

from moe.kernels import ops
from moe.kernels import triton_grouped_mm as tgm

pytestmark = pytest.mark.gpu


def _routing(T: int, E: int, k: int, gen: torch.Generator):
    top_w, top_e = torch.softmax(torch.randn(T, E, generator=gen), -1).topk(k, dim=-1)
    expert_A = top_e.flatten()
    order = torch.argsort(expert_A, stable=True)
    rows_A = torch.arange(T).repeat_interleave(k)[order]
    return rows_A.cuda(), top_w.flatten()[order].cuda(), torch.bincount(expert_A, minlength=E).cuda()


def _compiled_ptx(kernel) -> list[str]:
    """PTX of every binary Triton compiled for ``kernel`` in this process (its per-device JIT caches)."""
    return [compiled.asm["ptx"] for entry in kernel.device_caches.values() for compiled in entry[0].values()]


def test_expert_block_bf16_matches_fp32_reference_output_and_every_gradient():
    gen = torch.Generator().manual_seed(0)
    T, D, E, k, F = 2048, 512, 8, 2, 384
    rows_A, weight_A, counts_E = _routing(T, E, k, gen)
    leaves = {"x": torch.randn(T, D, generator=gen), "w_gate_up": torch.randn(E, D, 2 * F, generator=gen) / D**0.5,
              "w_down": torch.randn(E, F, D, generator=gen) / F**0.5}
    dout = torch.randn(T, D, generator=gen).cuda()
    results = {}
    for backend, dtype in (("triton", torch.bfloat16), ("reference", torch.float32)):
        t = {name: v.cuda().to(torch.bfloat16).to(dtype).requires_grad_() for name, v in leaves.items()}
        w = weight_A.to(dtype).detach().requires_grad_()
        out = ops.experts_combine(t["x"], rows_A, w, counts_E, t["w_gate_up"], t["w_down"], backend=backend)
        out.backward(dout.to(dtype))
        results[backend] = [out.detach(), t["x"].grad, t["w_gate_up"].grad, t["w_down"].grad, w.grad]
    for name, got, want in zip(("out", "dx", "dw_gate_up", "dw_down", "dweight"), results["triton"],
                               results["reference"]):
        err = (got.double() - want.double()).norm() / want.double().norm()
        assert err < 1e-2, (name, err.item())


def test_the_kernels_that_ran_use_this_gpu_s_mma_instruction():
    """After forward + backward in bf16: wgmma on sm_90 and newer, mma.sync before."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 256, generator=gen).cuda().to(torch.bfloat16).requires_grad_()
    w = torch.randn(4, 256, 512, generator=gen).cuda().to(torch.bfloat16).requires_grad_()
    rows = torch.randint(0, 512, (1024,), generator=gen).cuda()
    y = tgm.gather_grouped_mm(x, rows, w, torch.tensor([300, 0, 500, 224], device="cuda"))
    y.backward(torch.ones_like(y))
    want = "wgmma.mma_async" if torch.cuda.get_device_capability()[0] >= 9 else "mma.sync"
    for kernel in (tgm._gather_mm_kernel, tgm._gather_mm_dw_kernel):
        ptx = _compiled_ptx(kernel)
        assert ptx and all(want in p for p in ptx if ".bf16" in p), (kernel, want)


def test_weight_gradient_of_a_tensor_past_2_31_elements():
    """dw of shape (9, 4096, 65536): expert 8 starts at element 8·2^28 = 2^31, where the int32 offset
    e * stride wrapped before. A few rows per expert keep it fast; about 9 GiB of GPU memory."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    E, K, N, M = 9, 4096, 65536, 4
    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(E * M, K, device="cuda", generator=gen).to(torch.bfloat16)
    w = torch.zeros(E, K, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(E * M, N, device="cuda", generator=gen).to(torch.bfloat16)
    tgm.grouped_mm(x, w, torch.full((E,), M, device="cuda")).backward(dy)
    e = E - 1
    want = x[e * M:].float().T @ dy[e * M:].float()
    got = w.grad[e].float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    del w, got, want
    torch.cuda.empty_cache()
