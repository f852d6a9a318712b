"""The MoE layer against a naive per-token loop (output and every gradient), and its invariants."""

import os

import pytest
import torch

from moe.kernels import backends
from moe.config import MoEConfig, RouterConfig
from moe.ffn import SwiGLU
from moe.layer import MoELayer


def make_layer(D=20, E=5, F=12, k=3, dtype=torch.float64, **kw):
    router_kw = {key: kw.pop(key) for key in ("renormalize", "aux_loss_coef", "z_loss_coef") if key in kw}
    cfg = MoEConfig(num_experts=E, expert_hidden_size=F, router=RouterConfig(top_k=k, **router_kw), **kw)
    return MoELayer(cfg, D).to(dtype)


def naive_forward(layer: MoELayer, x_BSD: torch.Tensor) -> torch.Tensor:
    """Token by token: y_t = Σ_(t,e,w) w · FFN_e(x_t) (+ shared experts), with the layer's own routing."""
    B, S, D = x_BSD.shape
    x_TD = x_BSD.reshape(-1, D)
    r = layer.router(x_TD)
    F = layer.experts.expert_hidden_size
    rows = []
    for t in range(x_TD.shape[0]):
        acc = x_TD.new_zeros(D)
        for a in (r.token_index == t).nonzero().flatten().tolist():
            e = int(r.expert_index[a])
            wgu, wd = layer.experts.w_gate_up_ED2F[e], layer.experts.w_down_EFD[e]
            h = x_TD[t] @ wgu
            acc = acc + r.weight[a].to(x_TD.dtype) * ((torch.nn.functional.silu(h[:F]) * h[F:]) @ wd)
        rows.append(acc)
    out = torch.stack(rows)
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x_TD)
    return out.reshape(B, S, D)


def grads(layer, x, out, g):
    params = [x] + [p for p in layer.parameters()]
    return torch.autograd.grad(out, params, g, allow_unused=True)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (2, 13), (3, 7)])
def test_layer_equals_naive_loop_output_and_every_gradient(renormalize, shape, backend):
    layer = make_layer(renormalize=renormalize, num_shared_experts=1, backend=backend)
    x = torch.randn(*shape, 20, dtype=torch.float64, requires_grad=True)
    out, routing = layer(x)
    want = naive_forward(layer, x)
    assert torch.allclose(out, want, atol=1e-12)
    g = torch.randn_like(out)
    for got, exp, p in zip(grads(layer, x, out, g), grads(layer, x, want, g), ["x"] + [n for n, _ in layer.named_parameters()]):
        assert (got is None) == (exp is None), p
        if got is not None:
            assert torch.allclose(got, exp, atol=1e-12), p


@pytest.mark.parametrize("backend", ["torch", "triton", "tiled"])
def test_backends_give_the_reference_layer(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.fail("the Triton backend must be tested: tests/conftest.py sets TRITON_INTERPRET=1 on CPU")
    ref = make_layer(D=24, E=5, F=16, k=2, dtype=torch.float32, backend="reference")
    fast = make_layer(D=24, E=5, F=16, k=2, dtype=torch.float32, backend=backend)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 24)
    xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_r, _ = ref(xr)
    out_f, _ = fast(xf)
    assert torch.allclose(out_f, out_r, atol=1e-5)
    g = torch.randn_like(out_r)
    for a, b in zip(grads(ref, xr, out_r, g), grads(fast, xf, out_f, g)):
        assert torch.allclose(a, b, atol=1e-5)


def _load_dense_into_expert(layer: MoELayer, dense: SwiGLU, e: int) -> None:
    F = layer.experts.expert_hidden_size
    with torch.no_grad():
        layer.experts.w_gate_up_ED2F[e, :, :F] = dense.gate_proj.weight.t()
        layer.experts.w_gate_up_ED2F[e, :, F:] = dense.up_proj.weight.t()
        layer.experts.w_down_EFD[e] = dense.down_proj.weight.t()


def test_one_expert_moe_equals_dense_ffn():
    dense = SwiGLU(20, 12).double()
    for renormalize in (True, False):
        layer = make_layer(E=1, k=1, renormalize=renormalize)
        _load_dense_into_expert(layer, dense, 0)
        x = torch.randn(2, 5, 20, dtype=torch.float64)
        assert torch.allclose(layer(x)[0], dense(x), atol=1e-12)


def test_identical_experts_with_renormalised_topk_equal_dense_ffn():
    dense = SwiGLU(20, 12).double()
    layer = make_layer(E=6, k=2, renormalize=True)
    for e in range(6):
        _load_dense_into_expert(layer, dense, e)
    x = torch.randn(3, 4, 20, dtype=torch.float64)
    assert torch.allclose(layer(x)[0], dense(x), atol=1e-12)


def test_dropped_tokens_pass_through_with_zero_output():
    layer = make_layer(E=4, k=1, capacity_factor=1.0, min_capacity=0, renormalize=False)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 50.0
    x = torch.randn(1, 8, 20, dtype=torch.float64)
    x[..., 0] = 1.0  # every token prefers expert 2, which has C = 2 slots
    out, routing = layer(x)
    assert routing.tokens_per_expert.tolist() == [0, 0, 2, 0]
    assert out[0, :2].abs().sum() > 0 and torch.count_nonzero(out[0, 2:]) == 0
    assert routing.stats["dropped_fraction"].item() == pytest.approx(0.75)


def test_shared_experts_are_added_to_routed_output():
    layer = make_layer(num_shared_experts=2)
    assert layer.shared_experts.gate_proj.out_features == 24  # 2 experts x F=12
    x = torch.randn(1, 6, 20, dtype=torch.float64)
    out, _ = layer(x)
    shared = layer.shared_experts
    layer.shared_experts = None
    routed, _ = layer(x)
    assert torch.allclose(out, routed + shared(x), atol=1e-12)


def test_empty_expert_gets_zero_gradient_and_assignment_counts_match():
    layer = make_layer(E=4, k=1, renormalize=False, backend="reference")
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1, 0] = 50.0
    x = torch.randn(1, 10, 20, dtype=torch.float64)
    x[..., 0] = 1.0
    out, routing = layer(x)
    out.sum().backward()
    assert routing.tokens_per_expert.tolist() == [0, 10, 0, 0]
    g = layer.experts.w_gate_up_ED2F.grad
    assert torch.count_nonzero(g[[0, 2, 3]]) == 0 and torch.count_nonzero(g[1]) > 0


def test_layer_in_bf16_matches_fp32_within_tolerance():
    layer32 = make_layer(D=32, E=4, F=16, k=2, dtype=torch.float32)
    layer16 = make_layer(D=32, E=4, F=16, k=2, dtype=torch.bfloat16)
    layer16.load_state_dict(layer32.state_dict())
    x = torch.randn(2, 8, 32)
    out32, r32 = layer32(x)
    out16, r16 = layer16(x.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16 and r16.weight.dtype == torch.float32
    assert torch.allclose(out16.float(), out32, atol=2e-2, rtol=5e-2)
    assert backends.resolve_backend("auto", x.to(torch.bfloat16), layer16.experts.w_gate_up_ED2F) == "torch"
    # The whole expert block runs tiled on a CPU; a lone grouped GEMM asked of "tiled" runs on auto's choice.
    assert backends.resolve_block_backend("auto", x, layer32.experts.w_gate_up_ED2F) == "tiled"
    assert backends.resolve_backend("tiled", x, layer32.experts.w_gate_up_ED2F) == "torch"
