"""Drop-Upcycling (docs/routers.md#drop): r = 0 is copying; exactly floor(r·F) neurons re-drawn per expert from the
dense matrix's statistics; everything else bitwise; index sets differ across experts."""

import math

import pytest
import torch

from moe.upcycle import upcycle
from tests.moe.upcycle.common import dense_ffn, dense_model, expert_linear, logits, moe_cfg, probe, swiglu, token_ids


def changed(moe, dense, i):
    """Per expert, the sets of gate rows, up rows and down columns that differ from the dense matrices."""
    gate, up, down = dense_ffn(dense, i)
    g, u, d = expert_linear(moe.layers[i].mlp)
    rows = lambda diff: set(diff.nonzero().flatten().tolist())  # noqa: E731
    return [(rows((g[e] != gate).any(1)), rows((u[e] != up).any(1)), rows((d[e] != down).any(0)))
            for e in range(g.shape[0])]


def test_ratio_zero_is_copy_and_reproduces_the_dense_logits():
    dense = dense_model(num_layers=2)
    cfg = moe_cfg(E=4, k=2, M=24)
    drop = upcycle(dense, cfg, "drop", seed=3, ratio=0.0).eval()
    copy = upcycle(dense, cfg, "copy", seed=3, router_init="uniform")
    for (name, a), b in zip(drop.state_dict().items(), copy.state_dict().values()):
        assert torch.equal(a, b), name
    ids = token_ids()
    assert torch.allclose(logits(drop, ids), logits(dense, ids), rtol=0, atol=1e-10)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 1.0])
def test_exactly_floor_rF_whole_neurons_differ_per_expert_and_the_rest_is_bitwise(ratio):
    F, E = 20, 4
    dense = dense_model(num_layers=2, F=F)
    moe = upcycle(dense, moe_cfg(E=E, k=2, M=F), "drop", seed=0, ratio=ratio)
    n = math.floor(ratio * F)
    for i in range(2):
        sets = changed(moe, dense, i)
        for gate_rows, up_rows, down_cols in sets:
            assert len(gate_rows) == n and gate_rows == up_rows == down_cols  # shared index set: whole neurons
        # Index sets differ across experts (a fresh draw per expert and per layer).
        if n < F:
            assert len({frozenset(s[0]) for s in sets}) == E
    if n < F:
        assert changed(moe, dense, 0)[0][0] != changed(moe, dense, 1)[0][0]
    # Drop-Upcycling is not function-preserving for r > 0.
    ids = token_ids()
    assert (logits(moe.eval(), ids) - logits(dense, ids)).abs().max() > 1e-3


def test_independent_indices_per_matrix_draw_three_sets_of_floor_rF():
    dense = dense_model(num_layers=1, F=20)
    moe = upcycle(dense, moe_cfg(E=4, k=2, M=20), "drop", seed=0, ratio=0.5, independent_indices_per_matrix=True)
    sets = changed(moe, dense, 0)
    assert all(len(s) == 10 for per_expert in sets for s in per_expert)
    assert any(not (g == u == d) for g, u, d in sets)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_reinitialised_entries_match_each_dense_matrix_statistics(dtype):
    F, E, r = 64, 4, 0.5
    dense = dense_model(num_layers=1, F=F, dtype=dtype)
    mlp = dense.layers[0].mlp
    g = torch.Generator().manual_seed(0)
    # Different (μ, σ) per matrix, far from the router/init defaults, so global or wrong statistics fail.
    targets = {"gate_proj": (0.3, 0.7), "up_proj": (-0.2, 0.4), "down_proj": (0.05, 1.3)}
    with torch.no_grad():
        for name, (mu, sigma) in targets.items():
            w = getattr(mlp, name).weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float64) * sigma + mu)
    # NOTE: the seeds are fixed, so this is deterministic; a 3-standard-error band (the spec's) still excludes
    # about 0.3% of seeds per statistic, and a wrong μ or σ (init defaults, global statistics) misses by far more.
    moe = upcycle(dense, moe_cfg(E=E, k=2, M=F), "drop", seed=1, ratio=r)
    gate, up, down = dense_ffn(dense, 0)
    ge, ue, de = expert_linear(moe.layers[0].mlp)
    assert ge.dtype == dtype
    picks = {"gate_proj": [], "up_proj": [], "down_proj": []}
    for e, (rows, _, _) in enumerate(changed(moe, dense, 0)):
        idx = torch.tensor(sorted(rows))
        picks["gate_proj"].append(ge[e][idx].flatten())
        picks["up_proj"].append(ue[e][idx].flatten())
        picks["down_proj"].append(de[e][:, idx].flatten())
    for name, dense_w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
        fresh = torch.cat(picks[name]).double()
        mu, sigma = dense_w.double().mean(), dense_w.double().std()
        n = fresh.numel()
        assert n == E * math.floor(r * F) * 16
        assert abs(fresh.mean() - mu) < 3 * sigma / math.sqrt(n), name
        assert abs(fresh.std() - sigma) < 3 * sigma / math.sqrt(2 * (n - 1)), name


def test_zeroing_the_dropped_down_columns_leaves_the_dense_ffn_over_the_kept_neurons():
    F = 20
    dense = dense_model(num_layers=1, F=F)
    moe = upcycle(dense, moe_cfg(E=3, k=2, M=F), "drop", seed=0, ratio=0.4)
    gate, up, down = dense_ffn(dense, 0)
    g, u, d = expert_linear(moe.layers[0].mlp)
    x = probe()[0]
    for e, (dropped, _, _) in enumerate(changed(moe, dense, 0)):
        kept = torch.tensor(sorted(set(range(F)) - dropped))
        d_zeroed = d[e].clone()
        d_zeroed[:, torch.tensor(sorted(dropped))] = 0
        want = swiglu(x, gate[kept], up[kept], down[:, kept])
        assert torch.allclose(swiglu(x, g[e], u[e], d_zeroed), want, rtol=0, atol=1e-12)
