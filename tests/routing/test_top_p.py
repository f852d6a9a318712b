"""Dynamic top-p router: the properties of docs/routers.md#top_p (p=[.5,.3,.2] cases, k̄ vs θ, entropy loss)."""

import math

import pytest
import torch

from moe.config import MoEConfig, RouterConfig
from moe.routing.registry import ROUTERS, build_router
from moe.routing.top_p import TopPOptions, TopPRouter, entropy_loss, top_p_indices
from moe.routing.topk import TopKRouter
from tests.routing.helpers import identity_gate
from tests.routing.invariants import check_routing_invariants


def logit_router(E, threshold, **kw):
    """A float64 router whose logits are its input (W = I), so tests can write the logits directly."""
    opts = {k: kw.pop(k) for k in ("boundary", "max_experts", "entropy_loss_coef") if k in kw}
    opts.setdefault("entropy_loss_coef", 0.0)
    return identity_gate(TopPRouter(hidden_size=E, num_experts=E, aux_loss_coef=kw.pop("aux_loss_coef", 0.0),
                                    options=TopPOptions(threshold=threshold, **opts), **kw).double())


def count_by_loop(p_row, threshold, k_max):
    """Experts of one token, written out: descending probabilities until the running sum exceeds θ."""
    total, n = 0.0, 0
    for v in sorted(p_row.tolist(), reverse=True):
        total += v
        n += 1
        if total > threshold or n == k_max:
            break
    return n


@pytest.mark.parametrize("threshold, max_experts, capacity_factor", [
    (0.4, None, None), (0.9, None, 0.5), (0.9, 2, None), (0.0, None, 0.5),
])
def test_invariants(threshold, max_experts, capacity_factor):
    router = TopPRouter(hidden_size=16, num_experts=5, init_std=0.3, capacity_factor=capacity_factor,
                        eval_capacity_factor=capacity_factor, min_capacity=1,
                        options=TopPOptions(threshold=threshold, max_experts=max_experts))
    r = check_routing_invariants(router, torch.randn(37, 16))
    assert set(r.losses) == {"load_balancing", "entropy"}


def test_registry_and_config():
    assert ROUTERS["top_p"] is TopPRouter
    cfg = MoEConfig(num_experts=6, router=RouterConfig(name="top_p", options={"threshold": 0.7, "max_experts": 3}))
    router = build_router(cfg, 12)
    assert isinstance(router, TopPRouter) and router.top_k == 3 and router.options.threshold == 0.7
    assert router.options.entropy_loss_coef == 1e-4  # the paper's β
    for bad, field in [({"threshold": 1.0}, "threshold"), ({"threshold": -0.1}, "threshold"),
                       ({"max_experts": 0}, "max_experts"), ({"entropy_loss_coef": -1.0}, "entropy_loss_coef"),
                       ({"boundary": "ge"}, "boundary")]:
        with pytest.raises(ValueError, match=rf"router\.options\.{field}"):
            RouterConfig(name="top_p", options=bad)
    with pytest.raises(ValueError, match=r"router\.options\.max_experts must be <= moe\.num_experts=6"):
        build_router(MoEConfig(num_experts=6, router=RouterConfig(name="top_p", options={"max_experts": 7})), 8)
    with pytest.raises(ValueError, match="gumbel"):
        build_router(MoEConfig(router=RouterConfig(name="top_p", jitter="gumbel")), 8)


@pytest.mark.parametrize("threshold, boundary, experts, weights", [
    (0.4, "strict", [0], [0.5]),
    (0.6, "strict", [0, 1], [0.5, 0.3]),
    (0.5, "strict", [0, 1], [0.5, 0.3]),  # c_1 == θ: not crossed under ">"
    (0.5, "inclusive", [0], [0.5]),  # the paper's ">=" stops at c_1
    (0.85, "strict", [0, 1, 2], [0.5, 0.3, 0.2]),
])
def test_worked_cases_p_05_03_02(threshold, boundary, experts, weights):
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    idx = top_p_indices(p, threshold, 3, boundary)
    assert [e for e in idx[0].tolist() if e >= 0] == experts
    # Through the router, from logits log p (softmax gives back exactly 0.5 for the first expert).
    r = logit_router(3, threshold, boundary=boundary)(p.log())
    assert r.expert_index.tolist() == experts
    assert r.weight.tolist() == pytest.approx(weights, abs=1e-15)  # raw probabilities, not renormalized


def test_threshold_zero_is_top1_without_renormalization():
    E, T = 7, 30
    z = torch.randn(T, E, dtype=torch.float64)
    r = logit_router(E, 0.0)(z)
    topk = identity_gate(TopKRouter(hidden_size=E, num_experts=E, top_k=1, renormalize=False,
                                    aux_loss_coef=0.0).double())
    ref = topk(z)
    assert torch.equal(r.expert_index, ref.expert_index) and torch.equal(r.token_index, ref.token_index)
    assert torch.equal(r.weight, ref.weight)


def test_weights_are_raw_probabilities_and_every_logit_gets_gradient():
    E, T = 5, 12
    z = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    r = logit_router(E, 0.6)(z)
    p = torch.softmax(z, -1)
    assert torch.equal(r.weight, p[r.token_index, r.expert_index])
    (grad,) = torch.autograd.grad(r.weight.sum(), z)
    assert (grad != 0).all(), "raw softmax weights give every logit a gradient"


def test_mean_experts_grows_with_threshold_and_matches_loop():
    E, T = 8, 48
    z = 0.7 * torch.randn(T, E, dtype=torch.float64)
    p = torch.softmax(z, -1)
    kbar = []
    for th in [0.0, 0.2, 0.4, 0.6, 0.8, 0.95, 0.999]:
        r = logit_router(E, th)(z)
        kbar.append(r.stats["experts_per_token"].item())
        want = [count_by_loop(p[t], th, E) for t in range(T)]
        assert r.tokens_per_expert.sum().item() == sum(want)
        assert torch.bincount(r.token_index, minlength=T).tolist() == want
    assert kbar[0] == 1.0
    assert all(a <= b for a, b in zip(kbar, kbar[1:])), kbar
    assert len(set(kbar)) >= 5, "θ must actually change the number of experts"
    # k_max caps every token.
    capped = logit_router(E, 0.999, max_experts=3)(z)
    assert torch.bincount(capped.token_index, minlength=T).max().item() == 3


def test_flat_router_activates_all_experts_unless_capped():
    E = 8
    z = torch.zeros(4, E, dtype=torch.float64)  # p = 1/8: c_j = j/8, and c_7 = 0.875 <= 0.9
    assert logit_router(E, 0.9)(z).stats["experts_per_token"].item() == 8
    assert logit_router(E, 0.9, max_experts=4)(z).stats["experts_per_token"].item() == 4


def test_entropy_loss_value_and_gradient():
    E, T, D, beta = 6, 10, 4, 0.3
    router = TopPRouter(hidden_size=D, num_experts=E, aux_loss_coef=0.0,
                        options=TopPOptions(entropy_loss_coef=beta)).double()
    # Uniform p (zero router): β·log E.
    torch.nn.init.zeros_(router.weight)
    assert router(torch.randn(T, D, dtype=torch.float64)).losses["entropy"].item() == pytest.approx(beta * math.log(E))
    # Gradient: dH/dz_j = -p_j (log p_j + H), so dL/dW = (β/T) Σ_t (dH_t/dz_t)ᵀ x_t.
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(T, D, dtype=torch.float64)
    loss = router(x).losses["entropy"]
    (grad,) = torch.autograd.grad(loss, router.weight)
    p = torch.softmax(x @ router.weight.detach().t(), -1)
    H = -(p * p.log()).sum(-1, keepdim=True)
    dz = -p * (p.log() + H) * beta / T
    assert torch.allclose(grad, dz.t() @ x, rtol=0, atol=1e-14)
    assert loss.item() == pytest.approx(beta * H.mean().item(), abs=1e-14)
    # Minimizing the entropy sharpens the router: one gradient step lowers it.
    with torch.no_grad():
        router.weight -= 10.0 * grad
    assert router(x).losses["entropy"].item() < loss.item()
    # Stable where probabilities underflow to 0: no NaN.
    assert torch.isfinite(entropy_loss(torch.tensor([[0.0, -2000.0, -3000.0]], dtype=torch.float64)))


def test_load_balancing_f_over_the_variable_set():
    # Token 0: expert 0 alone; token 1: experts (1, 2); token 2: expert 2 alone.
    z = torch.tensor([[5.0, 0, 0], [0, 1.0, 0.9], [0, 0, 5.0]], dtype=torch.float64)
    r = logit_router(3, 0.6, aux_loss_coef=0.1)(z)
    assert r.expert_index.tolist() == [0, 1, 2, 2]
    P = torch.softmax(z, -1).float().mean(0)
    f = torch.tensor([1.0, 1.0, 2.0]) / 4  # Σf = 1 over the 4 assignments
    assert r.losses["load_balancing"].item() == pytest.approx(0.1 * 3 * (f * P).sum().item(), rel=1e-6)


def test_capacity_is_sized_by_mean_k():
    # Every token wants experts 0 then 1 (θ = 0.6 crosses at the second); A = 8, E = 4, cf = 1 -> C = 2.
    z = torch.tensor([[1.0, 0.8, -4, -4]] * 4, dtype=torch.float64)
    r = logit_router(4, 0.6, capacity_factor=1.0, min_capacity=0)(z)
    assert list(zip(r.token_index.tolist(), r.expert_index.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert r.stats["dropped_fraction"].item() == pytest.approx(0.5)
