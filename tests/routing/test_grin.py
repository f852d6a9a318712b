"""GRIN / SparseMixer-v2 router: the properties of docs/routers.md#grin."""

import pytest
import torch

from moe.config import MoEConfig, RouterConfig
from moe.layer import MoELayer
from moe.routing.registry import ROUTERS, build_router
from moe.routing.grin import GrinOptions, GrinRouter, sparsemixer_v2
from moe.routing.losses import load_balancing_loss
from tests.routing.helpers import identity_gate
from tests.routing.invariants import check_routing_invariants


def logit_router(E, k=2, eps=0.01, **kw):
    """A float64 router whose logits are its input (W = I), so tests can write the logits directly."""
    return identity_gate(GrinRouter(hidden_size=E, num_experts=E, top_k=k, eps=eps,
                                    aux_loss_coef=kw.pop("aux_loss_coef", 0.0), **kw).double())


def masked_softmax_by_loop(z_row, available, eps):
    """GRIN's mask for one token, written out: keep i iff z* - z_i <= 2ε·max(|z_i|, z*) among the available experts."""
    zmax = max(z_row[i].item() for i in available)
    keep = [i for i in available if zmax - z_row[i].item() <= 2 * eps * max(abs(z_row[i].item()), zmax)]
    pi = torch.zeros_like(z_row)
    pi[keep] = torch.softmax(z_row[keep], 0)
    argmax = min(keep, key=lambda i: (-z_row[i].item(), i))
    return keep, pi, argmax


def steps_by_loop(z, experts_TK, eps):
    """Per token and step: (kept experts, π, argmax of the remaining logits), given the chosen experts."""
    T, K = experts_TK.shape
    out = []
    for t in range(T):
        available, row = list(range(z.shape[1])), []
        for k in range(K):
            row.append(masked_softmax_by_loop(z[t], available, eps))
            available.remove(int(experts_TK[t, k]))
        out.append(row)
    return out


@pytest.mark.parametrize("k, training", [(1, True), (2, True), (3, False)])
def test_invariants(k, training):
    router = GrinRouter(hidden_size=16, num_experts=6, top_k=k, eps=0.2, init_std=0.3).train(training)
    r = check_routing_invariants(router, torch.randn(37, 16))
    assert r.num_assignments == 37 * k  # dropless, exactly k per token
    assert (r.expert_index.view(37, k).sort(-1).values.diff(dim=-1) > 0).all(), "a step repeated an expert"


def test_registry_and_config():
    assert ROUTERS["grin"] is GrinRouter
    cfg = MoEConfig(num_experts=16, router=RouterConfig(name="grin", top_k=2, jitter_eps=0.05, aux_loss_coef=1e-3,
                                                       options={"lb_f_from": "deterministic_topk"}))
    router = build_router(cfg, 8)
    assert isinstance(router, GrinRouter) and router.eps == 0.05 and router.top_k == 2
    assert router.aux_loss_coef == 1e-3 and router.options.lb_f_from == "deterministic_topk"
    assert GrinOptions() == GrinOptions(expert_grad_follows_reference_code=False, lb_f_from="routed")
    with pytest.raises(ValueError, match=r"router\.options\.lb_f_from"):
        RouterConfig(name="grin", options={"lb_f_from": "sampled"})
    with pytest.raises(ValueError, match=r"moe\.capacity_factor must be null"):
        build_router(MoEConfig(capacity_factor=1.25, router=RouterConfig(name="grin")), 8)
    with pytest.raises(ValueError, match=r"router\.jitter must be 'none'"):
        build_router(MoEConfig(router=RouterConfig(name="grin", jitter="input_jitter")), 8)


def test_eval_is_argmax_then_masked_softmax():
    E, T, eps = 6, 40, 0.15
    z = torch.randn(T, E, dtype=torch.float64)
    router = logit_router(E, k=2, eps=eps).eval()
    r = router(z)
    assert r.expert_grad_scale is None
    experts = r.expert_index.view(T, 2)
    w = r.weight.view(T, 2)
    # D_1 = argmax z, D_2 = argmax of the rest; weights are the masked-softmax values, not renormalized.
    order = z.sort(-1, descending=True).indices
    assert torch.equal(experts, order[:, :2])
    for t, row in enumerate(steps_by_loop(z, experts, eps)):
        for k, (_, pi, argmax) in enumerate(row):
            assert int(experts[t, k]) == argmax
            assert w[t, k].item() == pytest.approx(pi[argmax].item(), abs=1e-15)
    assert (w > 0).all() and (w <= 1).all() and (w.sum(-1) > 1).any(), "two weights near 1 are intended"
    again = router(z)
    assert torch.equal(r.expert_index, again.expert_index) and torch.equal(r.weight, again.weight)


def test_training_forward_is_s_times_masked_probability():
    E, T, eps = 6, 60, 0.3
    z = torch.randn(T, E, dtype=torch.float64)
    r = logit_router(E, k=2, eps=eps)(z)
    s = (1.0 / r.expert_grad_scale).view(T, 2)
    experts, w = r.expert_index.view(T, 2), r.weight.view(T, 2)
    assert set(s.unique().tolist()) == {1.0, 1.0 / 3.0}
    for t, row in enumerate(steps_by_loop(z, experts, eps)):
        for k, (keep, pi, argmax) in enumerate(row):
            d = int(experts[t, k])
            assert d in keep
            assert w[t, k].item() == pytest.approx(s[t, k].item() * pi[d].item(), abs=1e-15)
            if d == argmax:
                assert s[t, k].item() == 1.0


def closed_form_gradient(z, experts, g, eps):
    """Σ_k g_k·π_k[D_k]·(e_{D_k} - π_k), per token, from the loop-computed masks."""
    grad = torch.zeros_like(z)
    for t, row in enumerate(steps_by_loop(z, experts, eps)):
        for k, (_, pi, _) in enumerate(row):
            d = int(experts[t, k])
            onehot = torch.zeros_like(pi)
            onehot[d] = 1.0
            grad[t] += g[t, k] * pi[d] * (onehot - pi)
    return grad


@pytest.mark.parametrize("reference_code", [False, True])
def test_router_gradient_is_the_closed_form_and_zero_for_masked_experts(reference_code):
    E, T, K, eps = 6, 30, 2, 0.3
    z = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    router = logit_router(E, k=K, eps=eps, options=GrinOptions(expert_grad_follows_reference_code=reference_code))
    r = router(z)
    experts, w = r.expert_index.view(T, K), r.weight.view(T, K)
    g = torch.randn(T, K, dtype=torch.float64)
    (grad,) = torch.autograd.grad((w * g).sum(), z)
    want = closed_form_gradient(z.detach(), experts, g, eps)
    assert torch.allclose(grad, want, rtol=0, atol=1e-14)
    # The same as autograd through each step's masked softmax at D (no factor s), an independent derivation.
    zz = z.detach().clone().requires_grad_(True)
    total = zz.new_zeros(())
    for t, row in enumerate(steps_by_loop(z.detach(), experts, eps)):
        for k, (keep, _, _) in enumerate(row):
            mask = torch.ones(E, dtype=torch.bool)
            mask[keep] = False
            total = total + g[t, k] * torch.softmax(zz[t].masked_fill(mask, float("-inf")), 0)[experts[t, k]]
    (auto,) = torch.autograd.grad(total, zz)
    assert torch.allclose(grad, auto, rtol=0, atol=1e-14)
    # Experts outside every step's mask get exactly zero.
    for t, row in enumerate(steps_by_loop(z.detach(), experts, eps)):
        never = set(range(E)) - set().union(*(set(keep) for keep, _, _ in row))
        assert all(grad[t, e].item() == 0.0 for e in never)
    assert any(len(row[0][0]) < E for row in steps_by_loop(z.detach(), experts, eps)), "some expert must be masked"
    assert r.stats["heun_fraction"].item() > 0, "the s = 1/3 branch must occur, or 'no factor s' is untested"


def test_top1_masked_experts_get_exactly_zero_gradient_from_the_function():
    # One step (SparseMixerV2Weight's backward): π is zero outside the mask, so the gradient is exactly zero there.
    z = torch.tensor([[2.0, 1.95, 1.0, -3.0]], dtype=torch.float64, requires_grad=True)
    _, w, _ = sparsemixer_v2(z, 1, 0.02, training=True)
    (grad,) = torch.autograd.grad(w.sum() * 1.7, z)
    assert grad[0, 2].item() == 0.0 and grad[0, 3].item() == 0.0 and grad[0, :2].abs().sum() > 0


def test_isolated_top_logit_gives_weight_one_argmax_and_zero_gradient():
    # ε = 0.01: no other logit lies within the band at either step, so each step is deterministic.
    T = 2000
    z = torch.tensor([[5.0, 0.0, -1.0, -2.0]] * T, dtype=torch.float64, requires_grad=True)
    r = logit_router(4, k=2, eps=0.01)(z)
    assert r.expert_index.view(T, 2).tolist() == [[0, 1]] * T
    assert torch.equal(r.weight, torch.ones(2 * T, dtype=torch.float64))
    assert torch.equal(r.expert_grad_scale, torch.ones(2 * T, dtype=torch.float64))
    (grad,) = torch.autograd.grad((r.weight * torch.randn(2 * T, dtype=torch.float64)).sum(), z)
    assert torch.count_nonzero(grad) == 0


def chi_square(counts, probs):
    n = counts.sum()
    return (((counts - n * probs) ** 2) / (n * probs)).sum().item()


def test_sampling_follows_masked_softmax_and_s_is_one_a_quarter_of_the_time():
    """10⁵ draws (5·10⁴ tokens × 2 steps) with a fixed seed: D ~ π at each step (chi-square below the 0.1%
    critical value), masked experts are never drawn, and P(s = 1 | D not the argmax) = 1/4 ± 0.01: about 4.5·10⁴
    non-argmax draws, so ±0.01 is about 5 standard errors."""
    torch.manual_seed(1234)
    T, eps = 50_000, 0.45
    # Step 1 keeps {0, 1, 2}: 1 - 0.6 <= 0.9·1, 1 - 0.2 <= 0.9·1, but 1 - (-1) > 0.9·1.
    z_row = torch.tensor([1.0, 0.6, 0.2, -1.0], dtype=torch.float64)
    r = logit_router(4, k=2, eps=eps)(z_row.expand(T, 4).clone())
    experts = r.expert_index.view(T, 2)
    s = (1.0 / r.expert_grad_scale).view(T, 2)

    pi1 = torch.softmax(z_row[:3], 0)
    counts1 = torch.bincount(experts[:, 0], minlength=4).double()
    assert counts1[3].item() == 0
    assert chi_square(counts1[:3], pi1) < 13.82  # 2 degrees of freedom

    # Step 2 after D_1 = 0: remaining [0.6, 0.2, -1.0], z* = 0.6; keeps {1, 2} (0.4 <= 0.9·0.6, 1.6 > 0.9·1).
    second = experts[experts[:, 0] == 0, 1]
    counts2 = torch.bincount(second, minlength=4).double()
    assert counts2[0].item() == 0 and counts2[3].item() == 0
    assert chi_square(counts2[1:3], torch.softmax(z_row[1:3], 0)) < 10.83  # 1 degree of freedom

    # s: 1 on every argmax draw; among the other draws, 1 with probability 1/4 (B ~ Bernoulli(1/4)).
    argmax = torch.stack([torch.zeros(T, dtype=torch.long),
                          torch.where(experts[:, 0] == 0, 1, 0)], dim=1)  # argmax of what step 2 had left
    is_argmax = experts == argmax
    assert (s[is_argmax] == 1).all()
    non_argmax_s = s[~is_argmax]
    assert non_argmax_s.numel() > 40_000
    frac_one = (non_argmax_s == 1).double().mean().item()
    assert abs(frac_one - 0.25) < 0.01, frac_one
    assert ((non_argmax_s == 1) | (non_argmax_s == 1.0 / 3.0)).all()


def test_load_balancing_losses():
    E, T, eps, alpha = 5, 64, 0.4, 0.5
    z = torch.randn(T, E, dtype=torch.float64)
    probs = torch.softmax(z, -1)  # P: the full, unmasked softmax
    for lb_f_from in ("routed", "deterministic_topk"):
        torch.manual_seed(7)
        r = logit_router(E, k=2, eps=eps, aux_loss_coef=alpha, options=GrinOptions(lb_f_from=lb_f_from))(z)
        idx = r.expert_index.view(T, 2) if lb_f_from == "routed" else z.sort(-1, descending=True).indices[:, :2]
        f = torch.bincount(idx.reshape(-1), minlength=E).double() / (2 * T)
        want = alpha * E * (f * probs.mean(0)).sum().item()
        assert r.losses["load_balancing"].item() == pytest.approx(want, rel=1e-6), lb_f_from
        assert r.losses["load_balancing"].item() == pytest.approx(
            alpha * load_balancing_loss(probs, idx, E).item(), rel=1e-6)
    # Sampling makes the routed f differ from the deterministic one.
    torch.manual_seed(7)
    sampled = logit_router(E, k=2, eps=eps)(z).expert_index.view(T, 2)
    assert not torch.equal(sampled, z.sort(-1, descending=True).indices[:, :2])


def naive_expert_outputs(layer, x_TD, r):
    """FFN_e(x_t) for every assignment, written out per assignment."""
    F = layer.experts.expert_hidden_size
    rows = []
    for t, e in zip(r.token_index.tolist(), r.expert_index.tolist()):
        h = x_TD[t] @ layer.experts.w_gate_up_ED2F[e]
        rows.append((torch.nn.functional.silu(h[:F]) * h[F:]) @ layer.experts.w_down_EFD[e])
    return torch.stack(rows)


@pytest.mark.parametrize("reference_code", [False, True])
def test_layer_forward_is_s_p_ffn_and_expert_gradient_follows_the_flag(reference_code):
    E, D, T = 4, 8, 24
    cfg = MoEConfig(num_experts=E, expert_hidden_size=6, backend="reference",
                    router=RouterConfig(name="grin", top_k=2, jitter_eps=0.45, aux_loss_coef=0.0, init_std=0.5,
                                        options={"expert_grad_follows_reference_code": reference_code}))
    layer = MoELayer(cfg, D).double()
    x = torch.randn(1, T, D, dtype=torch.float64)
    out, r = layer(x)
    s = r.weight.new_ones(r.num_assignments) if reference_code else 1.0 / r.expert_grad_scale
    if reference_code:
        assert r.expert_grad_scale is None
        with torch.no_grad():  # recover s from w = s·π_D; it is 1 or 1/3
            z = x[0] @ layer.router.weight.t()
            pis = steps_by_loop(z, r.expert_index.view(T, 2), 0.45)
            pd = torch.tensor([pis[t][k][1][int(r.expert_index[2 * t + k])] for t in range(T) for k in range(2)],
                              dtype=torch.float64)
            s = r.weight.detach() / pd
    assert ((s - 1).abs() < 1e-12).sum() + ((s - 1 / 3).abs() < 1e-12).sum() == s.numel()
    assert (s < 1).any(), "the s = 1/3 branch must occur"
    y = naive_expert_outputs(layer, x[0], r)  # (A, D)
    p_d = r.weight.detach() / s

    # Forward: Σ_k s·π_D·FFN_D(x).
    want = torch.zeros(T, D, dtype=torch.float64).index_add_(0, r.token_index, (s * p_d).unsqueeze(1) * y)
    assert torch.allclose(out[0], want, rtol=0, atol=1e-13)

    # Expert gradient: that of π_D·FFN_D (paper), or of s·π_D·FFN_D (reference code).
    G = torch.randn(T, D, dtype=torch.float64)
    params = [layer.experts.w_gate_up_ED2F, layer.experts.w_down_EFD]
    got = torch.autograd.grad(out[0], params, G, retain_graph=True)
    coef = s * p_d if reference_code else p_d
    ref_out = torch.zeros(T, D, dtype=torch.float64).index_add_(0, r.token_index, coef.unsqueeze(1) * y)
    exp = torch.autograd.grad(ref_out, params, G)
    for a, b in zip(got, exp):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)

    # Router gradient through the layer: g = <G_t, FFN_D(x_t)>, then the closed form, then dL/dW = (dL/dz)ᵀ x.
    (gw,) = torch.autograd.grad(out[0], layer.router.weight, G)
    g = (G[r.token_index] * y).sum(-1).detach().view(T, 2)
    dz = closed_form_gradient((x[0] @ layer.router.weight.t()).detach(), r.expert_index.view(T, 2), g, 0.45)
    assert torch.allclose(gw, dz.t() @ x[0], rtol=0, atol=1e-12)
