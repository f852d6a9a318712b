"""Switch Transformer top-1 router: docs/routers.md#switch (and the capacity properties it relies on)."""

import math

import pytest
import torch

from moe.config import MoEConfig, RouterConfig
from moe.layer import MoELayer
from moe.routing.registry import ROUTERS, build_router
from moe.routing.switch import SwitchRouter
from moe.routing.topk import TopKRouter
from tests.routing.helpers import identity_gate
from tests.routing.invariants import check_routing_invariants


def make_router(E=4, D=8, **kw):
    return SwitchRouter(hidden_size=D, num_experts=E, **kw).double()


def identity_router(E, **kw):
    """A router whose logits are its input (D = E, W = I)."""
    return identity_gate(make_router(E=E, D=E, **kw))


def switch_config(**moe_kw):
    rc = moe_kw.pop("router", {})
    return MoEConfig(router=RouterConfig(name="switch", top_k=1, renormalize=False, **rc), **moe_kw)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("jitter", ["none", "input_jitter"])
def test_invariants(capacity_factor, jitter):
    router = SwitchRouter(hidden_size=16, num_experts=5, capacity_factor=capacity_factor,
                          eval_capacity_factor=capacity_factor, min_capacity=1, z_loss_coef=1e-3, jitter=jitter)
    r = check_routing_invariants(router, torch.randn(37, 16))
    assert set(r.losses) == {"load_balancing", "z_loss"}
    assert (r.stats["dropped_fraction"] > 0) == (capacity_factor is not None)


def test_registry_and_config_refuse_other_k_or_renormalisation():
    assert ROUTERS["switch"] is SwitchRouter
    router = build_router(switch_config(num_experts=4), 8)
    assert isinstance(router, SwitchRouter) and router.top_k == 1 and not router.renormalize
    with pytest.raises(ValueError, match="router.top_k must be 1 for the switch router, got 2"):
        build_router(MoEConfig(router=RouterConfig(name="switch", top_k=2, renormalize=False)), 8)
    with pytest.raises(ValueError, match="router.renormalize must be false for the switch router"):
        build_router(MoEConfig(router=RouterConfig(name="switch", top_k=1)), 8)


def test_gate_is_the_unrenormalised_argmax_probability():
    router = make_router(E=5, aux_loss_coef=0.0)
    x = torch.randn(20, 8, dtype=torch.float64)
    r = router(x)
    probs = torch.softmax(x @ router.weight.t(), -1)
    assert torch.equal(r.token_index, torch.arange(20))
    assert torch.equal(r.expert_index, probs.argmax(-1))
    assert torch.equal(r.weight, probs.max(-1).values)
    assert (r.weight < 1).all()


def test_task_gradient_reaches_every_logit_and_matches_finite_differences():
    router = make_router(E=5, D=6, aux_loss_coef=0.0)
    x = torch.randn(10, 6, dtype=torch.float64)
    coeff = torch.randn(10, dtype=torch.float64)

    def f(w):
        return (torch.func.functional_call(router, {"weight": w}, (x,)).weight * coeff).sum()

    w = router.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (w,))
    (grad,) = torch.autograd.grad(f(w), w)
    assert (grad.abs().sum(dim=1) > 0).all(), "every expert's logit must get gradient through the normaliser"


def test_load_balancing_loss_hand_example():
    # 4 tokens, 2 experts; p rows below, top-1 = [0, 0, 1, 0]: f = [3/4, 1/4], P = [0.65, 0.35].
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    r = identity_router(2, aux_loss_coef=0.01)(p.log())
    assert r.expert_index.tolist() == [0, 0, 1, 0]
    assert r.losses["load_balancing"].item() == pytest.approx(0.01 * 2 * (0.75 * 0.65 + 0.25 * 0.35), rel=1e-12)


def test_load_balancing_loss_is_alpha_when_f_is_uniform():
    # Two tokens per expert, arbitrary P: α·E·Σ(1/E)·P_e = α. With top-k and "tokens" normalisation: α·k.
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6],
                      [0.1, 0.3, 0.6]], dtype=torch.float64)
    r = identity_router(3, aux_loss_coef=0.01)(p.log())
    assert r.tokens_per_expert.tolist() == [2, 2, 2]
    assert r.losses["load_balancing"].item() == pytest.approx(0.01, rel=1e-12)
    topk = identity_gate(TopKRouter(hidden_size=3, num_experts=3, top_k=2, aux_loss_coef=0.01,
                                    lb_f_normalization="tokens").double())
    # top-2 sets {0,1}, {0,1}, {1,2}, {1,2}, {0,2}, {0,2}: every expert holds 4 of the 12 assignments.
    p2 = torch.tensor([[0.5, 0.4, 0.1], [0.4, 0.45, 0.15], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3],
                       [0.35, 0.05, 0.6]], dtype=torch.float64)
    r2 = topk(p2.log())
    assert torch.bincount(r2.expert_index, minlength=3).tolist() == [4, 4, 4]
    assert r2.losses["load_balancing"].item() == pytest.approx(0.02, rel=1e-12)


def test_load_balancing_gradient_flows_only_through_P():
    # dL/dz_tm = α·E/T · p_tm·(f_m − Σ_e f_e·p_te), with f held constant; dL/dW = (dL/dz)ᵀ x.
    alpha, E, T = 0.01, 4, 16
    router = make_router(E=E, D=6, aux_loss_coef=alpha)
    with torch.no_grad():
        router.weight.mul_(30)
    x = torch.randn(T, 6, dtype=torch.float64)
    r = router(x)
    (grad,) = torch.autograd.grad(r.losses["load_balancing"], router.weight)
    p = torch.softmax(x @ router.weight.detach().t(), -1)
    f = torch.bincount(r.expert_index, minlength=E).double() / T
    dz = alpha * E / T * p * (f - (p * f).sum(-1, keepdim=True))
    assert torch.allclose(grad, dz.t() @ x, rtol=0, atol=1e-15)


def test_capacity_keeps_the_first_C_tokens_and_the_rest_output_zero():
    T, E = 12, 3
    layer = MoELayer(switch_config(num_experts=E, expert_hidden_size=6, capacity_factor=1.0, min_capacity=0), 8)
    layer = layer.double()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 50.0  # every token prefers expert 0
    x = torch.randn(1, T, 8, dtype=torch.float64)
    x[..., 0] = 1.0
    out, routing = layer(x)
    C = math.ceil(1.0 * T / E)
    assert routing.token_index.tolist() == list(range(C)) and routing.expert_index.tolist() == [0] * C
    out = out.squeeze(0)
    assert (out[:C].abs().sum(-1) > 0).all()
    assert torch.equal(out[C:], torch.zeros_like(out[C:]))
    assert routing.stats["dropped_fraction"].item() == pytest.approx((T - C) / T)


def test_drop_fraction_follows_the_capacity_factor():
    T, E = 64, 4
    x = torch.randn(T, 8, dtype=torch.float64)
    x[:, 0] += 1.0
    dropless = make_router(E=E)
    with torch.no_grad():
        dropless.weight[0, 0] = 1.5  # skew the load towards expert 0
    n = torch.bincount(dropless(x).expert_index, minlength=E)
    assert n.max() > T / E
    previous = 1.0
    for cf in (0.25, 0.5, 1.0, 1.25, 2.0, float(E)):
        capped = make_router(E=E, capacity_factor=cf, min_capacity=0)
        capped.load_state_dict(dropless.state_dict())
        r = capped(x)
        C = math.ceil(cf * T / E)
        expected = (n - C).clamp(min=0).sum().item() / T
        got = r.stats["dropped_fraction"].item()
        assert got == pytest.approx(expected) and got <= previous
        assert torch.equal(r.tokens_per_expert, n.clamp(max=C))
        previous = got
    assert previous == 0.0


def test_f_is_counted_before_dropping_and_eval_uses_its_own_capacity():
    x = torch.randn(40, 8, dtype=torch.float64)
    dropless = make_router(E=4)
    capped = make_router(E=4, capacity_factor=0.3, eval_capacity_factor=None, min_capacity=0)
    capped.load_state_dict(dropless.state_dict())
    a, b = dropless(x), capped(x)
    assert b.stats["dropped_fraction"] > 0
    assert torch.equal(a.losses["load_balancing"], b.losses["load_balancing"])
    capped.eval()
    c = capped(x)
    assert c.stats["dropped_fraction"].item() == 0.0 and torch.equal(c.weight, a.weight)
