"""Top-k softmax router: the properties of docs/routers.md#topk, #load-balancing, #z-loss, #capacity."""

import math

import pytest
import torch

from moe.routing.registry import ROUTERS, router_class
from moe.routing.topk import TopKRouter
from moe.routing.capacity import capacity_keep_mask, expert_capacity
from moe.routing.losses import load_balancing_loss, z_loss
from tests.routing.invariants import check_routing_invariants


def make_router(E=5, D=8, k=2, **kw):
    return TopKRouter(hidden_size=D, num_experts=E, top_k=k, **kw).double()


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_invariants(renormalize, k, capacity_factor):
    router = TopKRouter(hidden_size=16, num_experts=5, top_k=k, renormalize=renormalize,
                        capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor, min_capacity=1)
    check_routing_invariants(router, torch.randn(37, 16))


def test_registry_names_valid_routers():
    assert ROUTERS["topk"] is TopKRouter
    with pytest.raises(ValueError, match="unknown router 'nope'; valid routers: topk"):
        router_class("nope")


def test_softmax_then_topk_weights_are_gathered_probs():
    router = make_router(renormalize=False, aux_loss_coef=0.0)
    x = torch.randn(20, 8, dtype=torch.float64)
    r = router(x)
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    expected = probs[r.token_index, r.expert_index]
    assert torch.equal(r.weight, expected)
    per_token = torch.zeros(20, dtype=torch.float64).index_add_(0, r.token_index, r.weight)
    assert (per_token <= 1 + 1e-12).all()
    assert torch.equal(r.token_index, torch.arange(20).repeat_interleave(2))


def test_topk_then_softmax_equals_renormalised_softmax():
    router = make_router(renormalize=True, aux_loss_coef=0.0)
    x = torch.randn(20, 8, dtype=torch.float64)
    r = router(x)
    logits = x @ router.weight.t()
    idx = r.expert_index.view(20, 2)
    probs = torch.softmax(logits, dim=-1).gather(1, idx)
    assert torch.allclose(r.weight.view(20, 2), probs / probs.sum(-1, keepdim=True), rtol=0, atol=1e-12)
    assert torch.allclose(r.weight.view(20, 2).sum(-1), torch.ones(20, dtype=torch.float64))


def test_ties_break_towards_lower_index():
    router = make_router(E=6, k=3, aux_loss_coef=0.0)
    torch.nn.init.zeros_(router.weight)
    r = router(torch.randn(4, 8, dtype=torch.float64))
    assert r.expert_index.view(4, 3).tolist() == [[0, 1, 2]] * 4


def test_renormalised_top1_gives_router_zero_task_gradient():
    router = make_router(k=1, renormalize=True, aux_loss_coef=0.0)
    r = router(torch.randn(10, 8, dtype=torch.float64))
    (grad,) = torch.autograd.grad((r.weight * torch.randn(10)).sum(), router.weight, allow_unused=True)
    assert grad is None or torch.count_nonzero(grad) == 0


def test_softmax_then_topk_gives_every_logit_gradient():
    # Float64 finite differences of the combine weights, and every expert row of W receives gradient.
    router = make_router(E=5, k=2, renormalize=False, aux_loss_coef=0.0)
    x = torch.randn(12, 8, dtype=torch.float64)
    coeff = torch.randn(24, dtype=torch.float64)

    def f(w):
        logits = x @ w.t()
        probs = torch.softmax(logits, -1)
        idx = router(x).expert_index.view(12, 2)  # selection is a constant
        return (probs.gather(1, idx).reshape(-1) * coeff).sum()

    w = router.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (w,))
    r = router(x)
    (grad,) = torch.autograd.grad((r.weight.double() * coeff).sum(), router.weight)
    assert (grad.abs().sum(dim=1) > 0).all(), "every expert's logit must get gradient"


def test_load_balancing_loss_hand_example():
    # 4 tokens, 2 experts, top-1. probs rows; top-1 = [0, 0, 1, 0] -> f = [3/4, 1/4], P = [0.65, 0.35].
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    idx = torch.tensor([[0], [0], [1], [0]])
    loss = load_balancing_loss(probs, idx, 2, "assignments")
    assert loss.item() == pytest.approx(2 * (0.75 * 0.65 + 0.25 * 0.35))
    # top-2 with "tokens" normalisation: every token picks both experts -> f = [1, 1], loss = E·ΣP = 2.
    idx2 = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    assert load_balancing_loss(probs, idx2, 2, "tokens").item() == pytest.approx(2.0)
    assert load_balancing_loss(probs, idx2, 2, "assignments").item() == pytest.approx(1.0)
    assert load_balancing_loss(probs, idx2, 2, "first_choice").item() == pytest.approx(1.15)


def test_load_balancing_loss_minimum_at_balance_and_gradient_only_through_P():
    E, T = 4, 8
    probs = torch.full((T, E), 1 / E, requires_grad=True)
    idx = torch.arange(T).remainder(E).unsqueeze(1)
    loss = load_balancing_loss(probs, idx, E)
    assert loss.item() == pytest.approx(1.0)
    (g,) = torch.autograd.grad(loss, probs)
    # d/dp_te of E·Σ f_e·mean_t p_te = E·f_e/T
    assert torch.allclose(g, torch.full((T, E), E * (1 / E) / T))


def test_router_reports_weighted_losses():
    router = make_router(aux_loss_coef=0.5, z_loss_coef=0.1)
    x = torch.randn(16, 8, dtype=torch.float64)
    r = router(x)
    logits = (x @ router.weight.t()).float()
    probs = torch.softmax(logits, -1)
    idx = r.expert_index.view(16, 2)
    assert r.losses["load_balancing"].item() == pytest.approx(0.5 * load_balancing_loss(probs, idx, 5).item(), rel=1e-5)
    assert r.losses["z_loss"].item() == pytest.approx(0.1 * z_loss(logits).item(), rel=1e-5)


def test_z_loss_at_zero_logits_and_gradient():
    E = 6
    assert z_loss(torch.zeros(3, E)).item() == pytest.approx(math.log(E) ** 2)
    z = torch.randn(5, E, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.logsumexp(z, -1).square().mean(), z)
    analytic = (2 / 5) * torch.logsumexp(z, -1, keepdim=True) * torch.softmax(z, -1)
    assert torch.allclose(g, analytic)


def test_capacity_formula():
    assert expert_capacity(1.25, 2, 64, 8, 4) == 20
    assert expert_capacity(0.01, 1, 64, 8, 4) == 4


def test_capacity_keeps_first_tokens_in_order():
    # every token prefers expert 0, cf=1, k=1: exactly the first C tokens keep their assignment.
    T, E = 12, 3
    idx = torch.zeros(T, 1, dtype=torch.long)
    C = expert_capacity(1.0, 1, T, E, 0)
    keep = capacity_keep_mask(idx, E, C)
    assert keep.squeeze(1).tolist() == [True] * C + [False] * (T - C)


def test_second_choices_never_displace_first_choices():
    # Expert 0 is the first choice of tokens 4..7 and the second choice of tokens 0..3; capacity 4.
    idx = torch.tensor([[1, 0], [2, 0], [1, 0], [2, 0], [0, 1], [0, 2], [0, 1], [0, 2]])
    keep = capacity_keep_mask(idx, 3, 4)
    assert keep[4:, 0].all() and not keep[:4, 1].any()


def test_capacity_mode_with_large_factor_equals_dropless():
    x = torch.randn(30, 8, dtype=torch.float64)
    dropless = make_router()
    capped = make_router(capacity_factor=100.0)
    capped.load_state_dict(dropless.state_dict())
    a, b = dropless(x), capped(x)
    assert torch.equal(a.token_index, b.token_index) and torch.equal(a.expert_index, b.expert_index)
    assert torch.equal(a.weight, b.weight)
    assert b.stats["dropped_fraction"].item() == 0.0


def test_dropped_fraction_is_reported():
    router = make_router(E=4, k=1, capacity_factor=1.0, min_capacity=0, aux_loss_coef=0.0)
    torch.nn.init.zeros_(router.weight)
    with torch.no_grad():
        router.weight[0, 0] = 10.0
    x = torch.zeros(8, 8, dtype=torch.float64)
    x[:, 0] = 1.0  # every token picks expert 0; capacity 2
    r = router(x)
    assert r.token_index.tolist() == [0, 1]
    assert r.stats["dropped_fraction"].item() == pytest.approx(6 / 8)
    assert r.tokens_per_expert.tolist() == [2, 0, 0, 0]


def test_topk_indices_fast_path_equals_the_stable_sort():
    """``topk_indices`` takes ``torch.topk`` when the k+1 best scores do not repeat; its answer must be the
    stable descending sort's in every case: distinct scores, ties (towards the lower index), -inf, NaN."""
    from moe.routing.token_choice import topk_indices

    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(50, 64, generator=g), torch.randint(0, 3, (50, 8), generator=g).float()]
    masked = torch.randn(50, 16, generator=g)
    masked[:, 5:] = float("-inf")  # group-limited routing masks most experts
    nan = torch.randn(4, 6, generator=g)
    nan[1, 2] = float("nan")
    for scores in cases + [masked, nan]:
        for k in (1, 2, 5, scores.shape[1]):
            want = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
            assert torch.equal(topk_indices(scores, k), want), (scores.shape, k)
