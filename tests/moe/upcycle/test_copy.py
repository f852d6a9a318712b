"""Sparse upcycling (docs/routers.md#copy) and the common contract (#upcycling-contract): exactness, bitwise
copies, storage."""

import math

import pytest
import torch

from moe.layer import MoELayer
from moe.upcycle import upcycle
from tests.moe.upcycle.common import dense_ffn, dense_model, expert_linear, logits, moe_cfg, probe, token_ids


@pytest.mark.parametrize("router_init", ["normal", "uniform"])
def test_copy_with_renormalized_topk_reproduces_the_dense_logits(router_init):
    dense = dense_model(num_layers=3)
    moe = upcycle(dense, moe_cfg(E=4, k=2, M=24), "copy", seed=0, router_init=router_init).eval()
    assert all(isinstance(layer.mlp, MoELayer) for layer in moe.layers)
    ids = token_ids()
    # The routing is not trivial: combine weights differ from 1/k, and several experts are used.
    routing = moe(ids).routings[0]
    assert routing.weight.std() > 1e-4 and int((routing.tokens_per_expert > 0).sum()) >= 2
    assert torch.allclose(logits(moe, ids), logits(dense, ids), rtol=0, atol=1e-10)


def test_copy_with_softmax_then_topk_scales_each_token_by_its_selected_mass():
    dense = dense_model()
    moe = upcycle(dense, moe_cfg(E=4, k=2, M=24, renormalize=False), "copy", seed=3, router_init="normal")
    layer = moe.layers[1].mlp
    with torch.no_grad():
        layer.router.weight.mul_(20)  # spread the probabilities so the mass differs visibly across tokens
        x = probe()
        out = layer(x)[0][0]
        want = dense.layers[1].mlp(x)[0]
        p = torch.softmax(x[0] @ layer.router.weight.T, dim=-1)
    mass = p.sort(dim=-1, descending=True).values[:, :2].sum(-1)  # (T,) Σ_{j in top-k} p_j
    assert mass.max() - mass.min() > 0.05
    assert torch.allclose(out, mass[:, None] * want, rtol=0, atol=1e-12)


def test_non_ffn_tensors_are_bitwise_copies_in_their_own_storage():
    dense = dense_model(num_layers=2)
    moe = upcycle(dense, moe_cfg(E=3, k=2, M=24), "copy", seed=0)
    dense_state, moe_state = dense.state_dict(), moe.state_dict()
    copied = [n for n in dense_state if ".mlp." not in n]
    assert len(copied) >= 12 and all(n in moe_state for n in copied)
    for name in copied:
        assert moe_state[name].dtype == dense_state[name].dtype, name
        assert torch.equal(moe_state[name], dense_state[name]), name
        assert moe_state[name].data_ptr() != dense_state[name].data_ptr(), name
    for (name, buf), (_, want) in zip(moe.named_buffers(), dense.named_buffers()):  # rotary tables
        assert torch.equal(buf, want), name


def test_every_expert_is_an_exact_copy_in_separate_memory():
    dense = dense_model(num_layers=2)
    moe = upcycle(dense, moe_cfg(E=4, k=2, M=24), "copy", seed=0)
    for i in range(2):
        gate, up, down = dense_ffn(dense, i)
        g, u, d = expert_linear(moe.layers[i].mlp)
        for e in range(4):
            assert torch.equal(g[e], gate) and torch.equal(u[e], up) and torch.equal(d[e], down)
        for w in (moe.layers[i].mlp.experts.w_gate_up_ED2F, moe.layers[i].mlp.experts.w_down_EFD):
            assert w.stride(0) != 0  # not an expand view
            assert len({w[e].data_ptr() for e in range(4)}) == 4
            assert w.untyped_storage().data_ptr() != gate.untyped_storage().data_ptr()
        # An in-place update of one expert leaves the others (and the dense model) alone.
        with torch.no_grad():
            moe.layers[i].mlp.experts.w_down_EFD[0].add_(1.0)
        assert torch.equal(expert_linear(moe.layers[i].mlp)[2][1], down)
        assert torch.equal(dense_ffn(dense, i)[2], down)


def test_tied_embeddings_stay_tied_and_the_dense_model_and_global_rng_are_untouched():
    dense = dense_model(tie=True)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    rng = torch.get_rng_state()
    moe = upcycle(dense, moe_cfg(E=2, k=1, M=24), "copy", seed=0)
    assert moe.lm_head.weight is moe.embed_tokens.weight
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())


def test_router_init_follows_the_option_and_the_seed():
    dense = dense_model(num_layers=2)
    cfg = moe_cfg(E=8, k=2, M=24)
    w = lambda m, i=0: m.layers[i].mlp.router.weight.detach()  # noqa: E731
    normal = upcycle(dense, cfg, "copy", seed=0)
    assert abs(w(normal).std().item() - 0.02) < 0.004 and not torch.equal(w(normal, 0), w(normal, 1))
    assert torch.equal(w(normal), w(upcycle(dense, cfg, "copy", seed=0)))
    assert not torch.equal(w(normal), w(upcycle(dense, cfg, "copy", seed=1)))
    assert torch.count_nonzero(w(upcycle(dense, cfg, "copy", seed=0, router_init="zero"))) == 0
    uni = w(upcycle(dense, cfg, "copy", seed=0, router_init="uniform"))
    assert abs(uni.mean().item()) < 1e-12 and abs(uni.std().item() - 0.02) < 0.004
    assert uni.abs().max() <= 0.02 * math.sqrt(3) + 1e-9  # uniform, not normal: bounded support


def test_noise_upcycling_perturbs_the_chosen_neurons_only():
    dense = dense_model(num_layers=1, F=20)
    moe = upcycle(dense, moe_cfg(E=3, k=2, M=20), "copy", seed=0, noise_std=0.02, noise_ratio=0.5)
    gate, up, down = dense_ffn(dense, 0)
    g, u, d = expert_linear(moe.layers[0].mlp)
    for e in range(3):
        rows = set((g[e] != gate).any(1).nonzero().flatten().tolist())
        assert len(rows) == 10
        assert rows == set((u[e] != up).any(1).nonzero().flatten().tolist())
        assert rows == set((d[e] != down).any(0).nonzero().flatten().tolist())
        assert (g[e] - gate).abs().max() < 0.02 * 6
