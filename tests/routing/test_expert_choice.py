"""Expert choice router: the properties of docs/routers.md#expert_choice (C per expert, zero-expert fraction, leak demo,
gate gradient only for the selected pairs), the causal refusal, threshold inference, and a model step."""

import pytest
import torch

from moe.config import ModelConfig, MoEConfig, RouterConfig
from moe.layer import MoELayer
from moe.model import MoEModel
from moe.routing.expert_choice import ExpertChoiceRouter
from moe.routing.registry import ROUTERS
from moe.routing.topk import TopKRouter
from moe.routing.expert_choice import expert_choice_capacity, expert_choice_select
from tests.routing.helpers import identity_gate
from tests.routing.invariants import check_routing_invariants


def make_router(E=4, D=8, **kw):
    kw.setdefault("causal", False)
    kw.setdefault("min_capacity", 0)
    return ExpertChoiceRouter(hidden_size=D, num_experts=E, **kw).double()


def probs_of(router, x):
    return torch.softmax(x.double() @ router.weight.double().t(), dim=-1)


def ec_moe_cfg(E=4, **options):
    return MoEConfig(num_experts=E, expert_hidden_size=8, backend="reference", min_capacity=1,
                     router=RouterConfig(name="expert_choice", options={"allow_causal_leak": True, **options}))


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("group", ["microbatch", "sequence"])
def test_invariants(capacity_factor, group):
    router = ExpertChoiceRouter(hidden_size=16, num_experts=5, capacity_factor=capacity_factor, causal=False,
                                group=group, z_loss_coef=1e-3)
    r = check_routing_invariants(router, torch.randn(37, 16))
    assert {"zero_expert_fraction", "max_experts_per_token", "router_entropy", "capacity"} <= set(r.stats)
    assert "load_balancing" not in r.losses and "z_loss" in r.losses


def test_registry_and_options():
    assert ROUTERS["expert_choice"] is ExpertChoiceRouter
    with pytest.raises(ValueError, match="router.options.threshold_momentum must be in"):
        RouterConfig(name="expert_choice", options={"threshold_momentum": 1.0})
    with pytest.raises(ValueError, match="router.options.group: 'global' is not one of"):
        RouterConfig(name="expert_choice", options={"group": "global"})


def test_capacity_formula():
    assert expert_choice_capacity(2.0, 64, 8, 0) == 16
    assert expert_choice_capacity(1.0, 10, 4, 0) == 3  # 2.5 rounds half up
    assert expert_choice_capacity(2.0, 5, 2, 0) == 5  # C > n clamps to n
    assert expert_choice_capacity(2.0, 1, 8, 4) == 1  # one token: every expert takes it
    assert expert_choice_capacity(0.01, 64, 8, 0) == 1  # never zero
    assert expert_choice_capacity(2.0, 64, 8, 20) == 20  # min_capacity


def test_tokens_per_expert_equals_capacity_and_top_c_sets():
    router = make_router(E=5, capacity_factor=2.0)
    x = torch.randn(23, 8, dtype=torch.float64)
    r = router(x)
    C = expert_choice_capacity(2.0, 23, 5, 0)
    assert C == 9 and r.tokens_per_expert.tolist() == [C] * 5
    assert r.stats["capacity"].item() == C
    probs = probs_of(router, x)
    for e in range(5):
        mine = r.token_index[r.expert_index == e]
        assert set(mine.tolist()) == set(torch.topk(probs[:, e], C).indices.tolist())
        assert torch.equal(r.weight[r.expert_index == e], probs[mine, e])  # gate = S[t, e]


def test_sequence_groups_take_capacity_per_sequence():
    router = make_router(E=4, capacity_factor=1.0, group="sequence")
    B, S = 3, 8
    x = torch.randn(B * S, 8, dtype=torch.float64)
    r = router(x, None, S)
    C = expert_choice_capacity(1.0, S, 4, 0)
    for b in range(B):
        in_seq = (r.token_index // S) == b
        assert torch.bincount(r.expert_index[in_seq], minlength=4).tolist() == [C] * 4
        # the same as routing that sequence alone
        alone = router(x[b * S:(b + 1) * S], None, S)
        assert sorted(zip(alone.token_index.tolist(), alone.expert_index.tolist())) == sorted(
            zip((r.token_index[in_seq] - b * S).tolist(), r.expert_index[in_seq].tolist()))
    with pytest.raises(ValueError, match="not a whole number of sequences"):
        router(x[:-1], None, S)


def test_zero_expert_fraction_hand_example():
    # 4 tokens, 2 experts, C = round(0.5·4/2) = 1, W = I so z_t = x_t. Expert 0 takes token 0 (S = 0.95),
    # expert 1 takes token 1; tokens 2 and 3 get no expert.
    router = identity_gate(make_router(E=2, D=2, capacity_factor=0.5))
    x = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    r = router(x)
    assert r.token_index.tolist() == [0, 1] and r.expert_index.tolist() == [0, 1]
    assert r.stats["zero_expert_fraction"].item() == 0.5
    assert r.stats["max_experts_per_token"].item() == 1.0
    assert r.stats["experts_per_token"].item() == 0.5

    # A collapsed router: every expert takes the same token, 3 of 4 tokens are skipped.
    with torch.no_grad():
        router.weight.zero_()
    x = torch.zeros(4, 2, dtype=torch.float64)  # all scores tie -> lower token index wins
    r = router(x)
    assert r.token_index.tolist() == [0, 0] and r.expert_index.tolist() == [0, 1]
    assert r.stats["zero_expert_fraction"].item() == 0.75
    assert r.stats["max_experts_per_token"].item() == 2.0


def test_token_taken_by_no_expert_has_exactly_zero_output():
    torch.manual_seed(1)
    layer = MoELayer(ec_moe_cfg(E=4, group="microbatch"), hidden_size=8).double()
    layer.router.capacity_factor = 0.5
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    out, r = layer(x)
    counts = torch.bincount(r.token_index, minlength=24)
    assert (counts == 0).any() and (counts > 0).any()
    out_TD = out.reshape(24, 8)
    assert torch.equal(out_TD[counts == 0], torch.zeros_like(out_TD[counts == 0]))
    assert (out_TD[counts > 0].abs().sum(-1) > 0).all()


def test_permutation_equivariant_over_tokens():
    router = make_router(E=5, capacity_factor=1.5)
    x = torch.randn(20, 8, dtype=torch.float64)
    perm = torch.randperm(20)
    a, b = router(x), router(x[perm])
    pairs_a = sorted(zip(a.token_index.tolist(), a.expert_index.tolist(), a.weight.tolist()))
    pairs_b = sorted(zip(perm[b.token_index].tolist(), b.expert_index.tolist(), b.weight.tolist()))
    assert pairs_a == pairs_b


def test_leak_demo_router_level():
    # One sequence of 8 tokens, 2 experts, C = 2. Changing token t+5 = 7 evicts token 2 from expert 0 under
    # expert choice; top-k routing of token 2 never changes.
    D = 2
    ec = make_router(E=2, D=D, capacity_factor=0.5)
    tk = TopKRouter(hidden_size=D, num_experts=2, top_k=1, aux_loss_coef=0.0).double()
    with torch.no_grad():
        ec.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tk.weight.copy_(ec.weight)
    x = torch.zeros(8, D, dtype=torch.float64)
    x[0, 0], x[2, 0] = 3.0, 2.0  # expert 0's two best tokens: 0 and 2
    x_changed = x.clone()
    x_changed[7, 0] = 2.5  # a future token that expert 0 now prefers to token 2

    def experts_of(router, inp, t):
        r = router(inp)
        return sorted(r.expert_index[r.token_index == t].tolist())

    assert 0 in experts_of(ec, x, 2) and 0 not in experts_of(ec, x_changed, 2)
    assert experts_of(tk, x, 2) == experts_of(tk, x_changed, 2)


def _tiny_model(router: RouterConfig, seed=0) -> MoEModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=32, max_position_embeddings=32,
                      moe=MoEConfig(num_experts=4, expert_hidden_size=8, backend="reference", min_capacity=1,
                                    router=router))
    return MoEModel(cfg).double()


def test_leak_demo_model_level():
    # Changing the input token at position t+5 changes the logits at an earlier position t under expert
    # choice, and never under token choice (causal attention alone cannot see the future).
    ec = _tiny_model(RouterConfig(name="expert_choice", options={"allow_causal_leak": True}))
    tk = _tiny_model(RouterConfig(name="topk", aux_loss_coef=0.0))
    ids = torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(0))
    t = 8
    leaked = False
    with torch.no_grad():
        base_ec, base_tk = ec(ids).logits, tk(ids).logits
        for v in range(32):
            changed = ids.clone()
            changed[0, t + 5] = v
            if v < 4:
                assert torch.allclose(tk(changed).logits[:, :t + 5], base_tk[:, :t + 5], rtol=0, atol=1e-12)
            if (ec(changed).logits[:, :t + 5] - base_ec[:, :t + 5]).abs().max() > 1e-9:
                leaked = True
                break
    assert leaked, "expert choice must let a future token change an earlier position's output"


def test_gate_gradient_only_for_selected_pairs():
    # Through the selection function: d(Σ c·gate)/dS is c at the selected (token, expert) pairs, 0 elsewhere.
    probs = torch.softmax(torch.randn(2, 7, 3, dtype=torch.float64), -1).requires_grad_(True)
    token_GEC, gate_GEC = expert_choice_select(probs, 3)
    coeff = torch.randn_like(gate_GEC)
    (g,) = torch.autograd.grad((gate_GEC * coeff).sum(), probs)
    expected = torch.zeros_like(probs)
    for grp in range(2):
        for e in range(3):
            expected[grp, token_GEC[grp, e], e] = coeff[grp, e]
    assert torch.equal(g, expected)

    # Through the router, float64: autograd equals the closed form
    # dL/dz_t = Σ_{pairs (t, e)} c · S_te · (onehot(e) - S_t),  dL/dW = Σ_t dL/dz_t ⊗ x_t,
    # and a token that no expert takes gets exactly zero gradient on its input.
    router = make_router(E=4, D=6, capacity_factor=0.75)
    x = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    r = router(x)
    c = torch.randn(r.num_assignments, dtype=torch.float64)
    gW, gx = torch.autograd.grad((r.weight * c).sum(), (router.weight, x))
    S = probs_of(router, x.detach())
    dz = torch.zeros(16, 4, dtype=torch.float64)
    for a in range(r.num_assignments):
        t, e = int(r.token_index[a]), int(r.expert_index[a])
        dz[t] += c[a] * S[t, e] * (torch.nn.functional.one_hot(torch.tensor(e), 4).double() - S[t])
    assert torch.allclose(gW, dz.t() @ x.detach(), rtol=1e-10, atol=1e-12)
    unpicked = torch.bincount(r.token_index, minlength=16) == 0
    assert unpicked.any()
    assert torch.equal(gx[unpicked], torch.zeros_like(gx[unpicked]))


def test_causal_model_refuses_by_default():
    with pytest.raises(ValueError, match="future tokens of the same sequence") as err:
        _tiny_model(RouterConfig(name="expert_choice"))
    assert "router.options.allow_causal_leak: true" in str(err.value)
    with pytest.raises(ValueError, match="allow_causal_leak"):
        ExpertChoiceRouter(hidden_size=4, num_experts=2)  # causal unless told otherwise


def test_model_forward_backward_with_allow_setting():
    model = _tiny_model(RouterConfig(name="expert_choice", z_loss_coef=1e-3,
                                     options={"allow_causal_leak": True}))
    ids = torch.randint(0, 32, (2, 12))
    out = model(ids, torch.roll(ids, -1, dims=1))
    (out.loss + out.aux_loss).backward()
    assert torch.isfinite(out.loss) and out.aux_loss > 0
    assert len(out.routings) == 2
    for layer in model.layers:
        g = layer.mlp.router.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
        assert layer.mlp.experts.w_down_EFD.grad.abs().sum() > 0
    C = expert_choice_capacity(2.0, 24, 4, 1)
    assert all(r.tokens_per_expert.tolist() == [C] * 4 for r in out.routings)


def test_threshold_inference_is_causal_and_saved():
    router = make_router(E=4, capacity_factor=1.0, eval_routing="threshold", threshold_momentum=0.75)
    x = torch.randn(32, 8, dtype=torch.float64)
    router.eval()
    with pytest.raises(RuntimeError, match="not been estimated"):
        router(x)

    router.train()
    probs = probs_of(router, x)
    C = expert_choice_capacity(1.0, 32, 4, 0)
    kth = probs.sort(dim=0, descending=True).values[C - 1]  # (E,) C-th largest per expert
    router(x)
    router(x)  # two micro-batches in one step: the mean is unchanged
    calls = []
    router.on_optimizer_step(lambda t: calls.append(t.clone()) or t * 3)  # 3 identical ranks
    assert len(calls) == 1 and calls[0][-1].item() == 2  # (sum of kth over groups, number of groups)
    assert torch.allclose(router.threshold, kth.float().to(router.threshold.dtype))
    router(x[:16])
    router.on_optimizer_step()
    kth16 = probs[:16].sort(dim=0, descending=True).values[expert_choice_capacity(1.0, 16, 4, 0) - 1]
    assert torch.allclose(router.threshold, (0.75 * kth + 0.25 * kth16).to(router.threshold.dtype))
    router.on_optimizer_step()  # a step without forwards leaves τ alone
    assert int(router.threshold_updates) == 2

    router.eval()
    full = router(x)
    picked = probs >= router.threshold.to(probs.dtype)
    assert torch.equal(torch.bincount(full.token_index * 4 + full.expert_index, minlength=128).bool(),
                       picked.reshape(-1))
    # one token at a time routes exactly as the full sequence
    for t in range(32):
        alone = router(x[t:t + 1])
        assert alone.expert_index.tolist() == full.expert_index[full.token_index == t].tolist()

    # τ is in the state dict and a fresh router loading it routes identically
    state = router.state_dict()
    assert set(state) == {"weight", "threshold", "threshold_updates"}
    fresh = make_router(E=4, capacity_factor=1.0, eval_routing="threshold").eval()
    fresh.load_state_dict(state)
    again = fresh(x)
    assert torch.equal(again.token_index, full.token_index) and torch.equal(again.expert_index, full.expert_index)


def test_top_c_decoding_one_token_at_a_time_differs_from_training():
    # The decode mismatch (docs/routers.md#expert_choice): a group of one token makes every expert take it.
    router = make_router(E=4, capacity_factor=1.0).eval()
    x = torch.randn(16, 8, dtype=torch.float64)
    full = router(x)
    assert full.tokens_per_expert.tolist() == [4] * 4
    assert router(x[3:4]).expert_index.tolist() == [0, 1, 2, 3]


def test_eval_capacity_factor_and_bf16_autocast():
    router = ExpertChoiceRouter(hidden_size=8, num_experts=4, capacity_factor=1.0, eval_capacity_factor=2.0,
                                causal=False)
    x = torch.randn(16, 8)
    assert router(x).tokens_per_expert.tolist() == [4] * 4
    router.eval()
    assert router(x).tokens_per_expert.tolist() == [8] * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x.bfloat16())
    assert r.weight.dtype == torch.float32


def test_kv_cache_decoding_matches_full_sequence_only_with_thresholds():
    # Generation feeds one token at a time (moe/generate.py). With eval_routing="threshold" routing is per token,
    # so incremental logits equal full-sequence logits; with top_c they do not (every expert takes the token).
    ids = torch.randint(0, 32, (1, 10), generator=torch.Generator().manual_seed(3))

    def incremental(model):
        cache = model.new_cache()
        first = model(ids[:, :4], cache=cache).logits
        rest = [model(ids[:, t:t + 1], cache=cache).logits for t in range(4, 10)]
        return torch.cat([first, *rest], dim=1)

    for eval_routing, equal in (("threshold", True), ("top_c", False)):
        model = _tiny_model(RouterConfig(name="expert_choice",
                                         options={"allow_causal_leak": True, "eval_routing": eval_routing}))
        model(torch.randint(0, 32, (4, 10)))  # one training forward estimates the thresholds
        for m in model.modules():
            if isinstance(m, ExpertChoiceRouter):
                m.on_optimizer_step()
        model.eval()
        with torch.no_grad():
            full, step = model(ids).logits, incremental(model)
        assert torch.allclose(full, step, rtol=0, atol=1e-10) == equal, eval_routing
