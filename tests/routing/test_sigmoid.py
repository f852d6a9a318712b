"""DeepSeek-V3 sigmoid router: docs/routers.md#sigmoid (gating, groups, loss-free bias, sequence-wise loss)."""

import threading

import pytest
import torch
from torch.func import functional_call

from moe.config import MoEConfig, RouterConfig
from moe.layer import MoELayer
from moe.routing.registry import ROUTERS, build_router
from moe.routing.sigmoid import SigmoidOptions, SigmoidRouter, sequence_load_balancing_loss
from tests.routing.invariants import check_routing_invariants


def make_router(E=8, D=12, k=2, dtype=torch.float64, **options):
    opts = {"seq_aux_loss_coef": 0.0, **options}
    kw = {key: opts.pop(key) for key in list(opts) if key in ("capacity_factor", "eval_capacity_factor",
                                                               "min_capacity", "aux_loss_coef", "renormalize")}
    return SigmoidRouter(hidden_size=D, num_experts=E, top_k=k, options=SigmoidOptions(**opts), **kw).to(dtype)


def selected_sets(routing, T, k):
    return routing.expert_index.view(T, k).sort(dim=-1).values


def reference_indices(scores, bias, k, n_groups, topk_groups):
    """Per-token loop written from the spec: groups by top-2 sum (with bias) or max, −inf masking, TopK."""
    T, E = scores.shape
    out = []
    for t in range(T):
        s = scores[t] + (0 if bias is None else bias)
        if n_groups > 1:
            g = s.view(n_groups, -1)
            group_score = g.topk(2).values.sum(-1) if bias is not None else g.max(-1).values
            keep = group_score.topk(topk_groups).indices
            mask = torch.full((n_groups, 1), float("-inf"), dtype=s.dtype)
            mask[keep] = 0
            s = (g + mask).view(E)
        out.append(sorted(s.topk(k).indices.tolist()))
    return torch.tensor(out)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_invariants(capacity_factor, groups, bias):
    router = make_router(E=8, D=16, k=3, dtype=torch.float32, n_groups=groups[0], topk_groups=groups[1],
                         loss_free_bias=bias, seq_aux_loss_coef=1e-4, aux_loss_coef=0.01,
                         capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor, min_capacity=1)
    if bias:
        with torch.no_grad():
            router.e_score_correction_bias.copy_(torch.randn(8))
    r = check_routing_invariants(router, torch.randn(37, 16))
    assert set(r.losses) == {"load_balancing", "seq_load_balancing"}
    assert "max_violation" in r.stats and "router_entropy" in r.stats
    assert (r.stats["dropped_fraction"] > 0) == (capacity_factor is not None)


def test_registry_and_config():
    assert ROUTERS["sigmoid"] is SigmoidRouter
    rc = RouterConfig(name="sigmoid", top_k=2, aux_loss_coef=0.0,
                      options={"n_groups": 4, "topk_groups": 2, "route_scale": 1.5})
    router = build_router(MoEConfig(num_experts=8, router=rc), 16)
    assert isinstance(router, SigmoidRouter)
    assert (router.options.n_groups, router.options.topk_groups, router.options.route_scale) == (4, 2, 1.5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_groups": 0}, "router.options.n_groups must be >= 1"),
        ({"n_groups": 2, "topk_groups": 3}, "router.options.topk_groups must be between 1 and"),
        ({"route_scale": 0.0}, "router.options.route_scale must be > 0"),
        ({"bias_update_rate": -1.0}, "router.options.bias_update_rate must be >= 0"),
        ({"seq_aux_loss_coef": -1.0}, "router.options.seq_aux_loss_coef must be >= 0"),
        ({"n_groups": 3}, "router.options.n_groups=3 must divide moe.num_experts=8"),
        ({"n_groups": 8, "topk_groups": 1}, "router.options.topk_groups=1 keeps 1 experts, fewer than"),
        ({"n_groups": 8, "topk_groups": 4}, "groups need >= 2 experts"),
        ({"groups": 2}, "unknown key router.options.groups"),
    ],
)
def test_bad_options_are_value_errors_naming_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        rc = RouterConfig(name="sigmoid", top_k=2, options=options)
        build_router(MoEConfig(num_experts=8, router=rc), 16)


def test_z_loss_is_refused():
    with pytest.raises(ValueError, match="router.z_loss_coef must be 0 for the sigmoid router"):
        build_router(MoEConfig(num_experts=8, router=RouterConfig(name="sigmoid", z_loss_coef=1e-3)), 16)


def test_without_bias_or_groups_indices_are_topk_of_sigmoid():
    for bias in (True, False):  # a fresh bias is zero
        router = make_router(k=3, loss_free_bias=bias)
        x = torch.randn(30, 12, dtype=torch.float64)
        r = router(x)
        expected = torch.sigmoid(x @ router.weight.t()).topk(3).indices.sort(-1).values
        assert torch.equal(selected_sets(r, 30, 3), expected)


def test_weights_come_from_unbiased_scores_and_sum_to_route_scale():
    router = make_router(k=3, route_scale=2.5)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.randn(8))
    x = torch.randn(30, 12, dtype=torch.float64)
    r = router(x)
    s = torch.sigmoid(x @ router.weight.t())
    idx = r.expert_index.view(30, 3)
    chosen = s.gather(1, idx)
    assert torch.allclose(r.weight.view(30, 3), 2.5 * chosen / chosen.sum(-1, keepdim=True), rtol=0, atol=1e-14)
    assert torch.allclose(r.weight.view(30, 3).sum(-1), torch.full((30,), 2.5, dtype=torch.float64))
    # The selection did use the bias: it differs from the unbiased top-3.
    assert not torch.equal(selected_sets(r, 30, 3), s.topk(3).indices.sort(-1).values)


def test_a_large_bias_forces_its_expert_into_every_token_without_weighing():
    router = make_router(k=2, route_scale=2.5)
    with torch.no_grad():
        router.e_score_correction_bias[5] = 10.0
    x = torch.randn(25, 12, dtype=torch.float64)
    r = router(x)
    idx = r.expert_index.view(25, 2)
    assert (idx == 5).any(dim=1).all()
    s = torch.sigmoid(x @ router.weight.t()).gather(1, idx)
    assert torch.allclose(r.weight.view(25, 2), 2.5 * s / s.sum(-1, keepdim=True), rtol=0, atol=1e-14)


def test_weights_are_independent_of_the_bias_for_a_fixed_selection():
    router = make_router(k=2)
    x = torch.randn(40, 12, dtype=torch.float64)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(0.1 * torch.randn(8))
    a = router(x)
    with torch.no_grad():
        router.e_score_correction_bias.add_(0.37)  # a uniform shift keeps every selection
    b = router(x)
    assert torch.equal(a.expert_index, b.expert_index)
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("bias", [True, False])
def test_group_limited_routing_matches_the_spec_even_with_negative_scores(bias):
    # Without the bias a group scores its max, so with k=2 only topk_groups=1 can change a choice.
    E, k, G, TG = 8, 2, 4, (2 if bias else 1)
    router = make_router(E=E, k=k, n_groups=G, topk_groups=TG, loss_free_bias=bias)
    with torch.no_grad():
        router.weight.mul_(50)  # spread the scores so that groups differ clearly
        if bias:  # every biased score s̃ = s + b is negative: 0-masking would pick the masked experts
            router.e_score_correction_bias.copy_(-5.0 + 0.5 * torch.randn(E))
    x = torch.randn(64, 12, dtype=torch.float64)
    r = router(x)
    s = torch.sigmoid(x @ router.weight.t())
    b = router.e_score_correction_bias.double() if bias else None
    got = selected_sets(r, 64, k)
    assert torch.equal(got, reference_indices(s, b, k, G, TG))
    # Every selected expert lies in one of the token's topk_groups best groups.
    sb = s + (0 if b is None else b)
    group_score = sb.view(64, G, -1).topk(2, -1).values.sum(-1) if bias else sb.view(64, G, -1).amax(-1)
    kept_groups = group_score.topk(TG, -1).indices
    assert (got // (E // G)).unsqueeze(-1).eq(kept_groups.unsqueeze(1)).any(-1).all()
    # The data discriminate: group limiting changes some tokens' choice, and the group-score rule matters.
    assert not torch.equal(got, reference_indices(s, b, k, 1, 1))
    other_rule = sb.view(64, G, -1).amax(-1) if bias else sb.view(64, G, -1).topk(2, -1).values.sum(-1)
    assert not torch.equal(kept_groups.sort(-1).values, other_rule.topk(TG, -1).indices.sort(-1).values)


def test_bias_is_an_fp32_buffer_without_gradient_saved_in_the_state_dict():
    router = make_router(k=2)
    names = [n for n, _ in router.named_parameters()]
    assert names == ["weight"]
    assert "e_score_correction_bias" in router.state_dict()
    assert "load_since_step" not in router.state_dict()
    bias = router.e_score_correction_bias
    assert bias.dtype == torch.float32 and not bias.requires_grad
    with torch.no_grad():
        bias.copy_(2.0 + 1e-3 * torch.arange(8))  # values that bf16 cannot hold
    saved = bias.clone()
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(router.e_score_correction_bias, saved)
    router.double()
    assert torch.equal(router.e_score_correction_bias, saved)
    # No gradient reaches it, from the weights or the losses.
    router = make_router(k=2, seq_aux_loss_coef=1e-2, aux_loss_coef=1e-2)
    r = router(torch.randn(16, 12, dtype=torch.float64), seq_len=8)
    (r.weight.sum() + sum(r.losses.values())).backward()
    assert router.e_score_correction_bias.grad is None and router.weight.grad is not None
    # A fresh router loads it back.
    other = make_router(k=2)
    other.load_state_dict(router.state_dict())
    assert torch.equal(other.e_score_correction_bias, router.e_score_correction_bias)


def one_hot_router(E=4, u=0.01):
    """k=1 router whose choice is the input's one-hot position."""
    router = make_router(E=E, D=E, k=1, bias_update_rate=u)
    with torch.no_grad():
        router.weight.copy_(10 * torch.eye(E))
    return router


def tokens_for(experts):
    return 2 * torch.nn.functional.one_hot(torch.tensor(experts), 4).double() - 1


def test_bias_update_rule():
    router = one_hot_router(u=0.01)
    router(tokens_for([0] * 5 + [1, 2, 3]))  # c = [5, 1, 1, 1], mean 2
    router.on_optimizer_step()
    assert router.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    router(tokens_for([0, 1, 2, 3]))  # balanced: sign(0) leaves b alone
    router.on_optimizer_step()
    assert router.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    router.on_optimizer_step()  # no forward since the last step: nothing changes
    assert router.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])


def test_load_accumulates_over_micro_batches_until_the_optimizer_step():
    # Micro-batches c = [10,0,0,0], [0,3,0,0], [0,0,3,0]: the total (mean 4) says [-, +, +, +]; the last
    # micro-batch alone would say [+, +, -, +].
    router = one_hot_router(u=0.01)
    for experts in ([0] * 10, [1] * 3, [2] * 3):
        router(tokens_for(experts))
    router.eval()
    router(tokens_for([3] * 50))  # eval forwards do not count
    router.train()
    router.on_optimizer_step()
    assert router.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])


def test_bias_update_goes_through_the_all_reduce_callable():
    router = one_hot_router(u=0.01)
    router(tokens_for([0] * 5 + [1, 2, 3]))
    seen = []

    def other_rank_overloads_expert_3(load):
        seen.append(load.clone())
        return load + torch.tensor([0, 0, 0, 20])  # global c = [5, 1, 1, 21], mean 7

    router.on_optimizer_step(other_rank_overloads_expert_3)
    assert [t.tolist() for t in seen] == [[5, 1, 1, 1]]
    assert router.e_score_correction_bias.tolist() == pytest.approx([0.01, 0.01, 0.01, -0.01])
    # A doubling all-reduce (two identical ranks) gives the update of the local load.
    router(tokens_for([0] * 5 + [1, 2, 3]))
    router.on_optimizer_step(lambda load: 2 * load)
    assert router.e_score_correction_bias.tolist() == pytest.approx([0.0, 0.02, 0.02, 0.0])


def test_two_data_parallel_ranks_end_with_identical_bias():
    # Two ranks see different micro-batches; a summing all-reduce (threads meeting at a barrier, as ranks
    # meet in a collective) keeps their biases equal. Without it they diverge.
    torch.manual_seed(1)
    base = make_router(E=8, k=2, bias_update_rate=1e-2)
    ranks = [make_router(E=8, k=2, bias_update_rate=1e-2) for _ in range(2)]
    local = [make_router(E=8, k=2, bias_update_rate=1e-2) for _ in range(2)]
    for r in ranks + local:
        r.load_state_dict(base.state_dict())
    batches = [[torch.randn(16, 12, dtype=torch.float64) + 0.5 * rank for _ in range(3)] for rank in range(2)]
    barrier, slots = threading.Barrier(2), [None, None]

    def all_reduce_for(rank):
        def all_reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        return all_reduce

    def train_rank(rank):
        for step in range(3):
            for micro in range(3):
                ranks[rank](batches[rank][micro] * (step + 1))
            ranks[rank].on_optimizer_step(all_reduce_for(rank))

    threads = [threading.Thread(target=train_rank, args=(rank,)) for rank in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    for rank in range(2):
        for step in range(3):
            for micro in range(3):
                local[rank](batches[rank][micro] * (step + 1))
            local[rank].on_optimizer_step()
    assert torch.equal(ranks[0].e_score_correction_bias, ranks[1].e_score_correction_bias)
    assert ranks[0].e_score_correction_bias.abs().sum() > 0
    assert not torch.equal(local[0].e_score_correction_bias, local[1].e_score_correction_bias)


def test_max_violation_falls_below_0_2_with_the_bias_alone():
    # A frozen router with per-expert logit offsets (expert 7 is favoured, expert 0 starved), the default
    # update rate u = 1e-3, no auxiliary loss: MaxVio must fall, block by block, below 0.2.
    torch.manual_seed(0)
    E, T = 8, 1024
    router = make_router(E=E, D=E + 1, k=2)
    assert router.options.bias_update_rate == 1e-3
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, :E] = torch.eye(E)
        router.weight[:, E] = torch.linspace(-1, 1, E)
    max_violation = []
    for _ in range(300):
        x = torch.cat([torch.randn(T, E, dtype=torch.float64), torch.ones(T, 1, dtype=torch.float64)], dim=1)
        max_violation.append(router(x).stats["max_violation"].item())
        router.on_optimizer_step()
    blocks = torch.tensor(max_violation).view(6, 50).mean(1)
    assert blocks[0] > 1.0
    assert (blocks[1:4] < blocks[:3]).all(), blocks
    assert blocks[-1] < 0.2, blocks
    assert max(max_violation[-50:]) < 0.2


def test_sequence_wise_loss_hand_example():
    # E=2, K=1, two sequences of S=2. s' rows; chosen experts [0, 0 | 0, 1].
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]], dtype=torch.float64)
    idx = torch.tensor([[0], [0], [0], [1]])
    # seq 1: f = 2/(1·2)·[2, 0] = [2, 0], P = [0.75, 0.25] -> 1.5
    # seq 2: f = [1, 1], P = [0.45, 0.55] -> 1.0
    assert sequence_load_balancing_loss(probs, idx, 2, seq_len=2).item() == pytest.approx((1.5 + 1.0) / 2)
    # One sequence of 4: f = [1.5, 0.5], P = [0.6, 0.4] -> 1.1
    assert sequence_load_balancing_loss(probs, idx, 2, seq_len=None).item() == pytest.approx(1.1)
    with pytest.raises(ValueError, match="seq_len=3 must be >= 1 and divide the 4 tokens"):
        sequence_load_balancing_loss(probs, idx, 2, seq_len=3)


def test_router_reports_weighted_sequence_and_batch_losses():
    router = make_router(k=2, seq_aux_loss_coef=1e-4, aux_loss_coef=0.5)
    x = torch.randn(24, 12, dtype=torch.float64)
    r = router(x, seq_len=6)
    s = torch.sigmoid(x @ router.weight.t())
    sn = s / s.sum(-1, keepdim=True)
    idx = r.expert_index.view(24, 2)
    f = torch.zeros(4, 8, dtype=torch.float64)
    for t in range(24):
        f[t // 6, idx[t]] += 8 / (2 * 6)
    expected_seq = (f * sn.view(4, 6, 8).mean(1)).sum(-1).mean()
    assert r.losses["seq_load_balancing"].item() == pytest.approx(1e-4 * expected_seq.item(), rel=1e-12)
    f_batch = torch.bincount(idx.reshape(-1), minlength=8).double() / 48
    assert r.losses["load_balancing"].item() == pytest.approx(0.5 * 8 * (f_batch * sn.mean(0)).sum().item(), rel=1e-12)


@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_gradients_match_finite_differences(groups):
    router = make_router(D=5, k=3, n_groups=groups[0], topk_groups=groups[1], route_scale=2.5,
                         seq_aux_loss_coef=1e-1, aux_loss_coef=1e-1)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(0.1 * torch.randn(8))
    x = torch.randn(12, 5, dtype=torch.float64)
    coeff = torch.randn(36, dtype=torch.float64)

    def f(w):
        r = functional_call(router, {"weight": w}, (x,), {"seq_len": 4})
        return (r.weight * coeff).sum(), r.losses["seq_load_balancing"], r.losses["load_balancing"]

    w = router.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (w,))


def test_capacity_drops_and_large_capacity_equals_dropless():
    x = torch.randn(30, 12, dtype=torch.float64)
    dropless = make_router(k=2)
    capped = make_router(k=2, capacity_factor=100.0)
    capped.load_state_dict(dropless.state_dict())
    a, b = dropless(x), capped(x)
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.weight, b.weight)
    tight = make_router(k=2, capacity_factor=0.5, min_capacity=0)
    tight.load_state_dict(dropless.state_dict())
    c = tight(x)
    assert (c.tokens_per_expert <= 4).all()  # C = ceil(0.5·2·30/8) = 4
    assert c.stats["dropped_fraction"].item() == pytest.approx(1 - c.num_assignments / 60)
    # The bias counts the routing decision, dropped or not.
    assert torch.equal(tight.load_since_step, torch.bincount(a.expert_index, minlength=8))


def test_moe_layer_with_sigmoid_router_trains():
    rc = RouterConfig(name="sigmoid", top_k=2, aux_loss_coef=0.0, options={"n_groups": 2, "topk_groups": 1})
    layer = MoELayer(MoEConfig(num_experts=4, expert_hidden_size=8, router=rc, num_shared_experts=1), 16).double()
    out, routing = layer(torch.randn(2, 5, 16, dtype=torch.float64))
    (out.square().mean() + sum(routing.losses.values())).backward()
    assert layer.router.weight.grad is not None and torch.isfinite(layer.router.weight.grad).all()
    layer.router.on_optimizer_step()
    assert layer.router.e_score_correction_bias.abs().sum() > 0
