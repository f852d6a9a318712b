"""GShard top-2 router: docs/routers.md#gshard (second-expert policies, legacy normalisation, rank-major capacity)."""

import math

import pytest
import torch

from moe.config import MoEConfig, RouterConfig
from moe.routing.registry import ROUTERS, build_router
from moe.routing.gshard import SECOND_POLICIES, GShardOptions, GShardRouter
from moe.routing.token_choice import token_choice_routing
from tests.routing.helpers import identity_gate
from tests.routing.invariants import check_routing_invariants


def make_router(E=5, D=8, aux_loss_coef=0.0, **kw):
    opts = {key: kw.pop(key) for key in list(kw) if key in GShardOptions.__dataclass_fields__}
    return GShardRouter(hidden_size=D, num_experts=E, aux_loss_coef=aux_loss_coef, options=GShardOptions(**opts),
                        **kw).double()


def identity_router(E, **kw):
    """A router whose logits are its input (D = E, W = I)."""
    return identity_gate(make_router(E=E, D=E, **kw))


def slots(routing, T):
    """(T, 2) expert per slot, -1 where the token has no assignment of that rank."""
    out = torch.full((T, 2), -1, dtype=torch.long)
    seen = torch.zeros(T, dtype=torch.long)
    for t, e in zip(routing.token_index.tolist(), routing.expert_index.tolist()):
        out[t, seen[t]] = e
        seen[t] += 1
    return out


@pytest.mark.parametrize("policy", SECOND_POLICIES)
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_invariants(policy, capacity_factor):
    router = GShardRouter(hidden_size=16, num_experts=5, capacity_factor=capacity_factor,
                          eval_capacity_factor=capacity_factor, min_capacity=1, z_loss_coef=1e-3,
                          options=GShardOptions(second_policy=policy))
    with torch.no_grad():
        router.weight.mul_(20)  # spread the gates so that the random and threshold policies drop some
    r = check_routing_invariants(router, torch.randn(37, 16))
    assert set(r.losses) == {"load_balancing", "z_loss"}
    for key in ("second_expert_keep_rate", "dropped_fraction_rank1", "dropped_fraction_rank2"):
        assert key in r.stats
    assert (r.stats["dropped_fraction"] > 0) == (capacity_factor is not None)


def test_registry_and_config_validation():
    assert ROUTERS["gshard"] is GShardRouter
    rc = RouterConfig(name="gshard", options={"second_policy": "threshold", "second_threshold": 0.3})
    router = build_router(MoEConfig(num_experts=4, router=rc), 8)
    assert isinstance(router, GShardRouter)
    assert (router.options.second_policy, router.options.second_threshold) == ("threshold", 0.3)
    assert router.options.second_policy_eval == "all" and router.options.normalize_before_policy
    for cfg, message in [
        (dict(top_k=3), "router.top_k must be 2 for the gshard router, got 3"),
        (dict(renormalize=False), "router.renormalize must be true for the gshard router"),
        (dict(options={"second_policy": "best"}), "router.options.second_policy: 'best' is not one of"),
        (dict(options={"second_threshold": 0.0}), r"router.options.second_threshold must be in \(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_router(MoEConfig(num_experts=4, router=RouterConfig(name="gshard", **cfg)), 8)


def test_policy_all_gives_legacy_normalised_top2():
    router = make_router(second_policy="all")
    x = torch.randn(20, 8, dtype=torch.float64)
    r = router(x)
    p = torch.softmax(x @ router.weight.t(), -1)
    top = p.topk(2, dim=-1)
    assert torch.equal(r.expert_index.view(20, 2), top.indices)
    g = top.values / top.values.sum(-1, keepdim=True)
    assert torch.allclose(r.weight.view(20, 2), g, rtol=0, atol=1e-15)
    assert r.stats["second_expert_keep_rate"].item() == 1.0


def test_policy_none_keeps_the_first_choice_with_its_unrenormalised_gate():
    router = make_router(second_policy="none")
    x = torch.randn(20, 8, dtype=torch.float64)
    r = router(x)
    top = torch.softmax(x @ router.weight.t(), -1).topk(2, dim=-1).values
    assert torch.equal(r.token_index, torch.arange(20))
    assert torch.allclose(r.weight, top[:, 0] / top.sum(-1), rtol=0, atol=1e-15)
    assert (r.weight < 1).all()


def test_threshold_policy_keeps_second_choices_above_tau():
    # ĝ2 = 1/(1 + e^{z1 - z2}); tokens with ĝ2 = 0.1, 0.19, 0.21, 0.4 and τ = 0.2.
    g2 = torch.tensor([0.1, 0.19, 0.21, 0.4], dtype=torch.float64)
    z = torch.zeros(4, 4, dtype=torch.float64)
    z[:, 0] = torch.log((1 - g2) / g2)
    z[:, 2:] = -20.0
    r = identity_router(4, second_policy="threshold", second_threshold=0.2)(z)
    assert slots(r, 4).tolist() == [[0, -1], [0, -1], [0, 1], [0, 1]]
    assert torch.allclose(r.weight, torch.tensor([0.9, 0.81, 0.79, 0.21, 0.6, 0.4], dtype=torch.float64),
                          rtol=0, atol=1e-7)


def test_random_policy_keeps_with_probability_g2_over_tau():
    # ĝ2 = 0.079, τ = 0.2: keep rate 0.395 over 2·10⁵ tokens (standard error 0.0011); ĝ2 = 0.3 ≥ τ: always kept.
    N = 200_000
    router = identity_router(4, second_policy="random", second_threshold=0.2)
    z = torch.tensor([math.log(0.921 / 0.079), 0.0, -20.0, -20.0], dtype=torch.float64)
    r = router(z.expand(N, 4))
    rate = (r.num_assignments - N) / N
    assert abs(rate - 0.395) < 0.005
    assert r.stats["second_expert_keep_rate"].item() == pytest.approx(rate)
    z_high = torch.tensor([math.log(0.7 / 0.3), 0.0, -20.0, -20.0], dtype=torch.float64)
    assert router(z_high.expand(1000, 4)).num_assignments == 2000
    # In eval the default policy is "all": deterministic, every second choice kept.
    router.eval()
    assert router(z.expand(1000, 4)).num_assignments == 2000


def test_non_legacy_path_tests_the_raw_probability_and_renormalises_after_dropping():
    # p = (0.521, 0.079, 0.2, 0.2): i1 = 0, i2 = 2 (the tie with 3 breaks towards the lower index).
    # Non-legacy, τ = 0.4: keep iff U < p_i2/τ = 0.5; a token left alone gets weight exactly 1.
    N = 200_000
    p = torch.tensor([0.521, 0.079, 0.2, 0.2], dtype=torch.float64)
    router = identity_router(4, second_policy="random", second_threshold=0.4, normalize_before_policy=False)
    r = router(p.log().expand(N, 4))
    counts = torch.bincount(r.token_index, minlength=N)
    first = counts.cumsum(0) - counts  # assignments are token-major, rank-minor
    kept2 = counts == 2
    assert (counts >= 1).all() and (r.expert_index[first] == 0).all()
    assert (r.expert_index[first[kept2] + 1] == 2).all()
    assert abs(kept2.double().mean().item() - 0.5) < 0.005
    w1 = r.weight[first]
    assert torch.allclose(w1[kept2], torch.full_like(w1[kept2], 0.521 / 0.721), rtol=0, atol=1e-12)
    assert torch.equal(w1[~kept2], torch.ones_like(w1[~kept2]))
    # The legacy path tests ĝ2 = 0.2/0.721 instead (keep rate 0.693) and never renormalises ĝ1.
    legacy = identity_router(4, second_policy="random", second_threshold=0.4)
    r2 = legacy(p.log().expand(N, 4))
    assert abs((r2.num_assignments - N) / N - 0.2 / 0.721 / 0.4) < 0.005
    assert (r2.weight[r2.expert_index == 0] < 1).all()


def test_sampling_policy_draws_the_second_expert_from_the_softmax_without_the_first():
    N, E = 50_000, 5
    z = torch.tensor([2.0, 0.5, 0.0, -0.5, 1.0], dtype=torch.float64)
    r = identity_router(E, second_policy="sampling")(z.expand(N, E))
    s = r.expert_index.view(N, 2)
    assert (s[:, 0] == 0).all() and (s[:, 1] != s[:, 0]).all()
    counts = torch.bincount(s[:, 1], minlength=E)[1:].double()
    expected = N * torch.softmax(z[1:], -1)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.27, chi2  # χ²(3 d.o.f.) at p = 0.001
    # The gates still come from the clean probabilities of the chosen pair.
    p = torch.softmax(z, -1)
    g1 = p[0] / (p[0] + p[s[:, 1]])
    assert torch.allclose(r.weight.view(N, 2)[:, 0], g1, rtol=0, atol=1e-12)


def test_capacity_is_rank_major():
    # Expert 0 is the second choice of tokens 0..3 and the first choice of tokens 4..7; C = ceil(0.75·2·8/3) = 4.
    # Token order alone would keep the earlier tokens' second choices.
    z = torch.tensor([[2, 3, 1], [2, 1, 3], [2, 3, 1], [2, 1, 3],
                      [3, 2, 1], [3, 1, 2], [3, 2, 1], [3, 1, 2]], dtype=torch.float64)
    router = identity_router(3, second_policy="all", capacity_factor=0.75, min_capacity=0)
    r = router(z)
    s = slots(r, 8)
    assert (s[4:, 0] == 0).all(), "first choices to expert 0 must all be kept"
    assert s[:4, 0].tolist() == [1, 2, 1, 2] and (s[:4, 1] == -1).all(), "second choices to 0 must be dropped"
    assert r.tokens_per_expert.tolist() == [4, 4, 4]
    assert r.stats["dropped_fraction_rank1"].item() == 0.0
    assert r.stats["dropped_fraction_rank2"].item() == 0.5


def test_second_choices_the_policy_drops_take_no_capacity():
    # C = 1. Tokens 0 and 1 have empty second slots; token 2's second choice (expert 0) must keep its slot.
    indices = torch.tensor([[1, -1], [1, -1], [1, 0]])
    weights = torch.full((3, 2), 0.5, dtype=torch.float64)
    r = token_choice_routing(indices, weights, None, num_experts=2, capacity_factor=1 / 3, min_capacity=0,
                             losses={}, has_empty_slots=True, per_rank_stats=True)
    assert list(zip(r.token_index.tolist(), r.expert_index.tolist())) == [(0, 1), (2, 0)]
    assert r.stats["dropped_fraction"].item() == pytest.approx(2 / 4)  # 4 requested, 2 computed
    assert r.stats["dropped_fraction_rank1"].item() == pytest.approx(2 / 3)
    assert r.stats["dropped_fraction_rank2"].item() == 0.0


def test_only_the_two_selected_logits_get_task_gradient():
    # With W = I the logits are the input, so the input's gradient is the logits' gradient.
    router = identity_router(6, second_policy="all")
    z = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    r = router(z)
    coeff = torch.randn(20, dtype=torch.float64)
    (grad,) = torch.autograd.grad((r.weight * coeff).sum(), z)
    idx = r.expert_index.view(10, 2)
    selected = torch.zeros(10, 6, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.count_nonzero(grad[~selected]) == 0
    # Closed form: ĝ1 = σ(z1 − z2), so ∂(c1·ĝ1 + c2·ĝ2)/∂z1 = (c1 − c2)·ĝ1·ĝ2 = −∂/∂z2.
    g = r.weight.view(10, 2)
    c = coeff.view(10, 2)
    d1 = (c[:, 0] - c[:, 1]) * g[:, 0] * g[:, 1]
    assert torch.allclose(grad.gather(1, idx), torch.stack([d1, -d1], 1), rtol=0, atol=1e-14)


@pytest.mark.parametrize("policy", ["all", "threshold"])
@pytest.mark.parametrize("legacy", [True, False])
def test_gradients_match_finite_differences(policy, legacy):
    router = make_router(E=5, D=5, aux_loss_coef=0.1, z_loss_coef=0.1, second_policy=policy,
                         normalize_before_policy=legacy, second_threshold=0.3)
    with torch.no_grad():
        router.weight.mul_(40)
    x = torch.randn(8, 5, dtype=torch.float64)

    def f(w):
        r = torch.func.functional_call(router, {"weight": w}, (x,))
        return r.weight, r.losses["load_balancing"], r.losses["z_loss"]

    w = router.weight.detach().clone().requires_grad_(True)
    if policy == "threshold":
        assert 8 < f(w)[0].numel() < 16, "the threshold should drop some second choices, not all"
    assert torch.autograd.gradcheck(f, (w,))


def test_load_balancing_loss_counts_first_choices():
    # f from i1 only: tokens' first choices [0, 0, 1, 2] over E = 3; P = mean p.
    z = torch.tensor([[3, 2, 0], [3, 0, 2], [0, 3, 2], [1, 0, 3]], dtype=torch.float64)
    router = identity_router(3, aux_loss_coef=0.01, second_policy="all")
    r = router(z)
    p = torch.softmax(z, -1)
    f = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert r.losses["load_balancing"].item() == pytest.approx(0.01 * 3 * (f * p.mean(0)).sum().item(), rel=1e-12)
