"""LLaMA-MoE neuron partitioning (docs/routers.md#neuron-split): exactness at k = E, the partition, clustering."""

import pytest
import torch

from moe.upcycle import upcycle, upcycle_with_report
from moe.upcycle.clustering import balanced_assign, balanced_kmeans
from tests.moe.upcycle.common import dense_ffn, dense_model, expert_linear, logits, moe_cfg, probe, swiglu, token_ids


def neuron_sets(moe, dense, i):
    """Recover each expert's dense neurons from its gate rows (random rows are distinct), and check that the up
    rows and the down columns (divided by the scale) come from the very same neurons."""
    gate, up, down = dense_ffn(dense, i)
    g, u, d = expert_linear(moe.layers[i].mlp)
    scale = d.new_tensor(0.0)
    sets = []
    for e in range(g.shape[0]):
        match = (g[e][:, None, :] == gate[None, :, :]).all(-1)  # (M, F)
        assert (match.sum(1) == 1).all()
        idx = match.float().argmax(1)
        assert torch.equal(u[e], up[idx])
        scale = d[e][0, 0] / down[0, idx[0]]
        assert torch.allclose(d[e], down[:, idx] * scale, rtol=1e-15, atol=0)
        sets.append(idx.tolist())
    return sets, scale.item()


@pytest.mark.parametrize("renormalize", [True, False])
def test_all_experts_active_with_uniform_weights_and_scale_E_reproduce_the_dense_logits(renormalize):
    dense = dense_model(num_layers=2, F=24)
    cfg = moe_cfg(E=4, k=4, M=6, renormalize=renormalize)
    moe = upcycle(dense, cfg, "neuron-split", seed=0, router_init="zero", scale=4.0).eval()
    ids = token_ids()
    assert torch.allclose(logits(moe, ids), logits(dense, ids), rtol=0, atol=1e-10)
    # The released default s = E/k = 1 is a heuristic, not an identity: with it the FFNs shrink by 1/E.
    heuristic = upcycle(dense, cfg, "neuron-split", seed=0, router_init="zero").eval()
    assert (logits(heuristic, ids) - logits(dense, ids)).abs().max() > 1e-3


def test_the_experts_sum_to_the_dense_ffn():
    dense = dense_model(num_layers=1, F=24)
    moe = upcycle(dense, moe_cfg(E=3, k=1, M=8), "neuron-split", seed=5, scale=1.0)
    x = probe()[0]
    g, u, d = expert_linear(moe.layers[0].mlp)
    total = sum(swiglu(x, g[e], u[e], d[e]) for e in range(3))
    assert torch.allclose(total, swiglu(x, *dense_ffn(dense, 0)), rtol=0, atol=1e-12)


def test_random_split_is_a_balanced_partition_shared_by_gate_up_and_down_with_scale_E_over_k():
    dense = dense_model(num_layers=2, F=24)
    moe, report = upcycle_with_report(dense, moe_cfg(E=4, k=2, M=6), "neuron-split", seed=0, probe_tokens=0)
    for i in range(2):
        sets, scale = neuron_sets(moe, dense, i)
        assert scale == pytest.approx(2.0, abs=1e-15) and report.layers[i].scale == 2.0  # E/k
        assert all(len(s) == 6 for s in sets)
        assert sorted(n for s in sets for n in s) == list(range(24))  # disjoint and covering
        assert sets != [list(range(e * 6, e * 6 + 6)) for e in range(4)]  # shuffled, not contiguous


def test_random_split_is_reproducible_with_a_seed():
    dense = dense_model(num_layers=1, F=24)
    cfg = moe_cfg(E=4, k=2, M=6)
    a, b, c = (upcycle(dense, cfg, "neuron-split", seed=s) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert neuron_sets(a, dense, 0)[0] != neuron_sets(c, dense, 0)[0]


@pytest.mark.parametrize("metric", ["l2", "cos"])
@pytest.mark.parametrize("proj_type", ["up", "gate"])
def test_clustering_gives_E_clusters_of_exactly_F_over_E_and_finds_planted_clusters(metric, proj_type):
    E, m, F = 4, 6, 24
    dense = dense_model(num_layers=1, F=F)
    # Plant E tight groups of m neurons (random members) in the clustered matrix.
    g = torch.Generator().manual_seed(3)
    planted = torch.arange(E).repeat_interleave(m)[torch.randperm(F, generator=g)]
    centers = torch.randn(E, 16, generator=g, dtype=torch.float64)
    rows = centers[planted] + 0.05 * torch.randn(F, 16, generator=g, dtype=torch.float64)
    mlp = dense.layers[0].mlp
    with torch.no_grad():
        (mlp.up_proj if proj_type == "up" else mlp.gate_proj).weight.copy_(rows)
    moe = upcycle(dense, moe_cfg(E=E, k=2, M=m), "neuron-split", seed=0, split="clustering", metric=metric,
                  proj_type=proj_type)
    sets, _ = neuron_sets(moe, dense, 0)
    assert sorted(n for s in sets for n in s) == list(range(F))
    assert sorted(sorted(s) for s in sets) == sorted(sorted((planted == c).nonzero().flatten().tolist())
                                                     for c in range(E))


def test_balanced_kmeans_sizes_are_exact_even_when_the_data_is_unbalanced():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 8, generator=g) + 5, torch.randn(6, 8, generator=g) - 5])  # 30 vs 6
    labels = balanced_kmeans(x, 4, generator=g)
    assert torch.bincount(labels, minlength=4).tolist() == [9, 9, 9, 9]
    # The greedy step gives each row its cheapest cluster with room, preferring the cheapest rows.
    cost = torch.tensor([[0.0, 5.0], [1.0, 2.0], [0.5, 9.0], [3.0, 0.0]])
    assert balanced_assign(cost, 2).tolist() == [0, 1, 0, 1]


def test_E_must_divide_F():
    with pytest.raises(ValueError, match="neuron-split: moe.num_experts=5 must divide model.intermediate_size=24"):
        upcycle(dense_model(num_layers=1), moe_cfg(E=5, k=2, M=4), "neuron-split", seed=0)
