"""Adaptive gating router: the properties of docs/routers.md#adaptive (T=0 → top-1, T>1 → top-2, k̄ vs T)."""

import math

import pytest
import torch

from moe.config import MoEConfig, RouterConfig
from moe.routing.registry import ROUTERS, build_router
from moe.routing.adaptive import AdaptiveOptions, AdaptiveRouter
from moe.routing.losses import load_balancing_loss
from moe.routing.topk import TopKRouter
from tests.routing.helpers import identity_gate
from tests.routing.invariants import check_routing_invariants


def logit_router(E, threshold, single_expert_weight="gshard", **kw):
    """A float64 router whose logits are its input (W = I), so tests can write the logits directly."""
    return identity_gate(AdaptiveRouter(
        hidden_size=E, num_experts=E, aux_loss_coef=kw.pop("aux_loss_coef", 0.0),
        options=AdaptiveOptions(threshold=threshold, single_expert_weight=single_expert_weight), **kw).double())


def per_token(r, T):
    """{token: [(expert, weight), ...]} in assignment order."""
    out = {t: [] for t in range(T)}
    for t, e, w in zip(r.token_index.tolist(), r.expert_index.tolist(), r.weight.tolist()):
        out[t].append((e, w))
    return out


@pytest.mark.parametrize("single_expert_weight, capacity_factor, threshold", [
    ("gshard", None, 0.1), ("one", 0.5, 0.1), ("raw", None, 0.0), ("gshard", 0.5, 2.0),
])
def test_invariants(single_expert_weight, capacity_factor, threshold):
    router = AdaptiveRouter(hidden_size=16, num_experts=5, init_std=0.3, capacity_factor=capacity_factor,
                            eval_capacity_factor=capacity_factor, min_capacity=1,
                            options=AdaptiveOptions(threshold=threshold, single_expert_weight=single_expert_weight))
    r = check_routing_invariants(router, torch.randn(37, 16))
    assert r.losses["load_balancing"].requires_grad


def test_registry_and_config():
    assert ROUTERS["adaptive"] is AdaptiveRouter
    cfg = MoEConfig(num_experts=6, router=RouterConfig(name="adaptive", z_loss_coef=1e-3,
                                                      options={"threshold": 0.3, "single_expert_weight": "raw"}))
    router = build_router(cfg, 12)
    assert isinstance(router, AdaptiveRouter) and router.options == AdaptiveOptions(threshold=0.3,
                                                                                  single_expert_weight="raw")
    assert "z_loss" in router(torch.randn(4, 12)).losses
    with pytest.raises(ValueError, match=r"router\.options\.threshold must be >= 0"):
        RouterConfig(name="adaptive", options={"threshold": -0.1})
    with pytest.raises(ValueError, match=r"router\.options\.single_expert_weight"):
        AdaptiveOptions(single_expert_weight="half")
    with pytest.raises(ValueError, match=r"unknown key router\.options\.top_p"):
        RouterConfig(name="adaptive", options={"top_p": 0.3})
    with pytest.raises(ValueError, match="gumbel"):
        build_router(MoEConfig(router=RouterConfig(name="adaptive", jitter="gumbel")), 8)
    with pytest.raises(ValueError, match="num_experts must be >= 2"):
        AdaptiveRouter(hidden_size=4, num_experts=1)


def test_threshold_zero_is_top1_everywhere():
    E, T = 6, 40
    z = torch.randn(T, E, dtype=torch.float64)
    r = logit_router(E, 0.0)(z)
    assert torch.equal(r.token_index, torch.arange(T))
    assert torch.equal(r.expert_index, z.argmax(-1))
    p = torch.softmax(z, -1)
    top2 = p.topk(2, -1).values
    assert torch.allclose(r.weight, top2[:, 0] / top2.sum(-1), rtol=0, atol=1e-15)  # "gshard" weight
    assert r.stats["experts_per_token"].item() == 1.0


@pytest.mark.parametrize("threshold", [1.0 + 1e-9, 1.5, 100.0])
def test_threshold_above_one_is_top2_everywhere_and_equals_gshard_all(threshold):
    E, T = 6, 40
    z = torch.randn(T, E, dtype=torch.float64)
    r = logit_router(E, threshold)(z)
    topk = identity_gate(TopKRouter(hidden_size=E, num_experts=E, top_k=2, renormalize=True,
                                    aux_loss_coef=0.0).double())
    ref = topk(z)
    assert torch.equal(r.token_index, ref.token_index) and torch.equal(r.expert_index, ref.expert_index)
    assert torch.equal(r.weight, ref.weight)
    assert r.stats["experts_per_token"].item() == 2.0


@pytest.mark.parametrize("single_expert_weight, single_w", [("gshard", 0.6 / 0.9), ("one", 1.0), ("raw", 0.6)])
def test_worked_example_p_06_03_01(single_expert_weight, single_w):
    z = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64).log()  # gap p1 - p2 = 0.3
    one = per_token(logit_router(3, 0.25, single_expert_weight)(z), 1)[0]
    assert [e for e, _ in one] == [0] and one[0][1] == pytest.approx(single_w, abs=1e-15)
    two = per_token(logit_router(3, 0.35, single_expert_weight)(z), 1)[0]
    assert [e for e, _ in two] == [0, 1]
    assert [w for _, w in two] == pytest.approx([0.6 / 0.9, 0.3 / 0.9], abs=1e-15)


def test_mean_experts_grows_with_threshold_and_matches_gap_rule():
    E, T = 8, 64
    z = 1.5 * torch.randn(T, E, dtype=torch.float64)
    p = torch.softmax(z, -1).sort(-1, descending=True).values
    gap = p[:, 0] - p[:, 1]
    thresholds = [0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.01]
    kbar = []
    for th in thresholds:
        r = logit_router(E, th)(z)
        kbar.append(r.stats["experts_per_token"].item())
        assert kbar[-1] == pytest.approx(1 + (gap < th).double().mean().item())  # computed by hand
        assert r.stats["single_expert_fraction"].item() == pytest.approx((gap >= th).double().mean().item())
    assert kbar[0] == 1.0 and kbar[-1] == 2.0
    assert all(a <= b for a, b in zip(kbar, kbar[1:])), kbar
    assert len(set(kbar)) >= 4, "the thresholds must actually change the decision"


def test_single_expert_weight_gradients():
    # A single-expert token: gap 0.3 >= 0.25. Logits are the input, so d(weight)/d(input) is d/dz.
    z0 = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64).log()
    g1, g2 = 0.6 / 0.9, 0.3 / 0.9
    expected = {
        # d ĝ1/dz = ĝ1·(e_1 - ĝ) over the selected pair, 0 elsewhere: GShard keeps a router gradient.
        "gshard": torch.tensor([g1 * (1 - g1), -g1 * g2, 0.0], dtype=torch.float64),
        "one": torch.zeros(3, dtype=torch.float64),  # renormalized over {i1}: exactly 1, no task gradient
        "raw": 0.6 * torch.tensor([1.0 - 0.6, -0.3, -0.1], dtype=torch.float64),
    }
    for mode, want in expected.items():
        z = z0.clone().requires_grad_(True)
        r = logit_router(3, 0.25, mode)(z)
        assert r.num_assignments == 1
        (grad,) = torch.autograd.grad(r.weight.sum(), z, allow_unused=True)
        grad = torch.zeros_like(z) if grad is None else grad
        assert torch.allclose(grad[0], want, rtol=0, atol=1e-14), mode


def test_load_balancing_over_the_variable_set():
    # Tokens 0, 1 single (expert 0); tokens 2, 3 pairs (1, 2) and (2, 1).
    z = torch.tensor([[4.0, 0, 0], [4.0, 0, 0], [0, 1.0, 0.9], [0, 0.9, 1.0]], dtype=torch.float64)
    router = logit_router(3, 0.5, aux_loss_coef=0.1)
    r = router(z)
    assert r.expert_index.tolist() == [0, 0, 1, 2, 2, 1]
    probs = torch.softmax(z, -1).float()
    P = probs.mean(0)
    f_assign = torch.tensor([2, 2, 2]) / 6  # Σf = 1 over the 6 assignments actually chosen
    assert r.losses["load_balancing"].item() == pytest.approx(0.1 * 3 * (f_assign * P).sum().item(), rel=1e-6)
    idx = torch.tensor([[0, -1], [0, -1], [1, 2], [2, 1]])
    f_first = torch.tensor([2, 1, 1]) / 4
    assert load_balancing_loss(probs, idx, 3, "first_choice").item() == pytest.approx(3 * (f_first * P).sum().item())
    f_tokens = torch.tensor([2, 2, 2]) / 4
    assert load_balancing_loss(probs, idx, 3, "tokens").item() == pytest.approx(3 * (f_tokens * P).sum().item())


def test_capacity_is_sized_by_mean_k_and_keeps_first_choices_first():
    # Tokens 0-3: expert 0 alone. Tokens 4-7: pair (0, 1). A = 12, E = 3, cf = 1 -> C = ceil(12/3) = 4 (not the
    # ceil(1·2·8/3) = 6 of a top-2 sizing). Expert 0 keeps its first four first choices (tokens 0-3).
    z = torch.tensor([[5.0, 0, -5]] * 4 + [[1.0, 0.9, -5]] * 4, dtype=torch.float64)
    router = logit_router(3, 0.5, capacity_factor=1.0, min_capacity=0)
    r = router(z)
    assert list(zip(r.token_index.tolist(), r.expert_index.tolist())) == [(0, 0), (1, 0), (2, 0), (3, 0),
                                                                          (4, 1), (5, 1), (6, 1), (7, 1)]
    assert r.tokens_per_expert.tolist() == [4, 4, 0]
    assert r.stats["dropped_fraction"].item() == pytest.approx(4 / 12)
    # A large factor equals dropless exactly.
    big, free = logit_router(3, 0.5, capacity_factor=100.0)(z), logit_router(3, 0.5)(z)
    assert torch.equal(big.expert_index, free.expert_index) and torch.equal(big.weight, free.weight)
    assert math.isclose(big.stats["dropped_fraction"].item(), 0.0)
