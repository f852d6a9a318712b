"""NVIDIA fine-grained upcycling with virtual groups and weight scaling (docs/routers.md#granular)."""

import pytest
import torch

from moe.upcycle import upcycle, upcycle_with_report
from tests.moe.upcycle.common import dense_ffn, dense_model, expert_linear, logits, moe_cfg, probe, token_ids


@pytest.mark.parametrize("N, G, k", [(8, 2, 4), (6, 3, 3), (4, 1, 2)])
def test_topk_then_softmax_with_virtual_groups_and_a_equal_G_reproduces_the_dense_logits(N, G, k):
    dense = dense_model(num_layers=2, F=24)
    moe, report = upcycle_with_report(dense, moe_cfg(E=N, k=k, M=24 // G), "granular", seed=0, granularity=G)
    assert [entry.scale for entry in report.layers] == [G, G]
    router = moe.layers[0].mlp.router.weight.detach()
    group_rows = router[::G]
    assert torch.cdist(group_rows, group_rows).add(torch.eye(N // G)).min() > 1e-3  # distinct random groups
    ids = token_ids()
    routing = moe.eval()(ids).routings[0]
    # The router is not uniform (exactness holds for any router): tokens pick different groups, and with
    # several groups per token the groups get different weights.
    assert len(set(routing.expert_index.view(-1, k)[:, 0].tolist())) >= 2
    assert k == G or routing.weight.std() > 1e-4
    assert torch.allclose(logits(moe, ids), logits(dense, ids), rtol=0, atol=1e-10)


@pytest.mark.parametrize("N, G, k", [(8, 2, 4), (6, 3, 3)])
def test_softmax_then_topk_output_ratio_is_a_times_the_selected_mass_over_G(N, G, k):
    dense = dense_model(num_layers=1, F=24)
    moe = upcycle(dense, moe_cfg(E=N, k=k, M=24 // G, renormalize=False), "granular", seed=0, granularity=G)
    a = N * G / k
    layer = moe.layers[0].mlp
    with torch.no_grad():
        layer.router.weight.mul_(30)  # keep the virtual groups tied, spread the probabilities
        x = probe()
        out = layer(x)[0][0]
        want = dense.layers[0].mlp(x)[0]
        p = torch.softmax(x[0] @ layer.router.weight.T, dim=-1)
    mass = p.sort(dim=-1, descending=True).values[:, :k].sum(-1)
    ratio = a * mass / G
    assert ratio.max() - ratio.min() > 0.05
    assert torch.allclose(out, ratio[:, None] * want, rtol=0, atol=1e-12)


def test_softmax_then_topk_with_a_zero_router_reproduces_the_dense_logits():
    dense = dense_model(num_layers=2, F=24)
    moe = upcycle(dense, moe_cfg(E=8, k=4, M=12, renormalize=False), "granular", seed=0, granularity=2,
                  router_init="zero").eval()
    ids = token_ids()
    assert torch.allclose(logits(moe, ids), logits(dense, ids), rtol=0, atol=1e-10)


@pytest.mark.parametrize("scale_mode", ["down", "megatron"])
def test_the_shards_of_each_virtual_group_reproduce_the_dense_weights(scale_mode):
    N, G, F = 6, 3, 24
    dense = dense_model(num_layers=1, F=F)
    moe = upcycle(dense, moe_cfg(E=N, k=3, M=F // G), "granular", seed=0, granularity=G, scale_mode=scale_mode)
    gate, up, down = dense_ffn(dense, 0)
    g, u, d = expert_linear(moe.layers[0].mlp)
    a = float(G)
    c_in, c_out = (1.0, a) if scale_mode == "down" else (a ** (1 / 3), a ** (1 / 3))
    for r in range(N // G):
        members = range(r * G, r * G + G)
        assert torch.allclose(torch.cat([g[e] for e in members]), gate * c_in, rtol=1e-15, atol=0)
        assert torch.allclose(torch.cat([u[e] for e in members]), up * c_in, rtol=1e-15, atol=0)
        assert torch.allclose(torch.cat([d[e] for e in members], dim=1), down * c_out, rtol=1e-15, atol=0)
    if scale_mode == "down":
        assert torch.equal(g[4], gate[8:16])  # expert e is shard e mod G, copied bitwise


def test_megatron_scaling_is_not_exact_for_swiglu_but_down_scaling_is():
    dense = dense_model(num_layers=1, F=24)
    cfg = moe_cfg(E=4, k=2, M=12)
    errors = {mode: upcycle_with_report(dense, cfg, "granular", seed=0, granularity=2, scale_mode=mode)[1]
              .layers[0] for mode in ("down", "megatron")}
    assert errors["down"].exact_expected and errors["down"].max_abs_error < 1e-12
    assert not errors["megatron"].exact_expected and errors["megatron"].max_abs_error > 1e-4


def test_router_rows_are_equal_within_a_virtual_group_and_distinct_across_groups():
    dense = dense_model(num_layers=2, F=24)
    moe = upcycle(dense, moe_cfg(E=8, k=4, M=6), "granular", seed=0, granularity=4)
    for i in range(2):
        w = moe.layers[i].mlp.router.weight.detach()
        for e in range(8):
            assert torch.equal(w[e], w[(e // 4) * 4])
        assert not torch.equal(w[0], w[4])
    assert not torch.equal(moe.layers[0].mlp.router.weight, moe.layers[1].mlp.router.weight)
    free = upcycle(dense, moe_cfg(E=8, k=4, M=6), "granular", seed=0, granularity=4, virtual_groups=False)
    w = free.layers[0].mlp.router.weight.detach()
    assert len({tuple(row.tolist()) for row in w}) == 8


def test_invalid_granularity_raises_and_partial_groups_warn():
    dense = dense_model(num_layers=1, F=24)
    with pytest.raises(ValueError, match=r"granular: moe.num_experts=6 must be a multiple of granularity=4"):
        upcycle(dense, moe_cfg(E=6, k=4, M=6), "granular", seed=0, granularity=4)
    with pytest.raises(ValueError, match=r"granular: granularity=5 must divide model.intermediate_size=24"):
        upcycle(dense, moe_cfg(E=10, k=5, M=4), "granular", seed=0, granularity=5)
    with pytest.warns(UserWarning, match="top_k=3 is not a multiple of granularity=2"):
        moe, report = upcycle_with_report(dense, moe_cfg(E=8, k=3, M=12), "granular", seed=0, granularity=2)
    assert not report.layers[0].exact_expected and report.layers[0].max_abs_error > 1e-6
