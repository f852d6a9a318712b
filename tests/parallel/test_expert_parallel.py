"""Expert parallelism on 4 gloo ranks equals one process holding every expert: outputs and gradients.

One spawned job (``expert_parallel_checks``) runs every check; the tests below assert on its results.

What "equal" means here. An expert-parallel group of P ranks, each with its own micro-batch, is compared
with one process that holds all E experts and runs the concatenation of the group's P micro-batches:

* logits, and the gradients of the expert weights (each compared on its owning rank with the matching slice
  of the single process's gradient): **bitwise equal** in fp32. The dispatcher gives every expert its rows in
  (source rank, token) order, the very order of the single process's concatenated batch, and the expert
  weight gradient is then the same GEMM over the same rows. (The row results of a CPU matmul do not depend
  on how many rows it is given, which the parity itself checks.)
* every other parameter's gradient (attention, embeddings, norms, routers), summed over the EP group as data
  parallelism would: **allclose, rtol 1e-5 and atol 1e-5 · max|grad|** (measured differences are printed
  by ``-s``, about 1e-7 relative). These are sums over tokens: the single process sums all of them in one
  reduction, expert parallelism sums per rank and then adds P partial sums, a different order of fp32
  additions. Routing itself is not affected: it is per token for the routers compared here.

With world 4 the sizes are: EP 4 (one group), EP 2 (two groups; for top-k their expert gradients are also
reduced over their expert-data-parallel groups and compared with the whole world's), EP 1 (every rank alone).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from moe.routing.registry import ROUTERS
from tests.parallel.launcher import run_distributed

WORLD = 4
EP_SIZES = (1, 2, 4)
B, S, V = 2, 8, 64  # micro-batch per rank, sequence, vocabulary
NUM_EXPERTS = 4
# RouterConfig settings per router (beyond top_k=2 and the defaults), chosen so that every token's routing
# is the same whichever other tokens share its micro-batch: the condition for comparing EP with one process.
ROUTER_SETTINGS = {
    "switch": {"top_k": 1, "renormalize": False},  # the class pins both
    "hash": {"options": {"vocab_size": V}},  # required
    # Expert choice picks each expert's top tokens within a routing group: one sequence (ranks hold whole
    # sequences) rather than the micro-batch, which differs between a rank and the single process.
    "expert_choice": {"options": {"allow_causal_leak": True, "group": "sequence"}},
    # Mesh-TF's default "random" second-expert policy draws per token: a rank and the single process draw
    # different numbers. "all" is deterministic.
    "gshard": {"options": {"second_policy": "all"}},
}
# Routers whose training mode samples (GRIN's SparseMixer draws per token): compared in eval() mode, which
# still backpropagates but takes the argmax.
EVAL_MODE = {"grin"}
# (router, backend, EP size): top-k on every EP size, on the default CPU backend ("torch" grouped_mm) and the
# reference loop; every other router on EP 2 (two local experts: the regrouping of received rows) and EP 4.
CASES = ([("topk", "torch", P) for P in EP_SIZES] + [("topk", "reference", P) for P in (2, 4)]
         + [(name, "torch", P) for name in ROUTERS if name != "topk" for P in (2, 4)])


def _config(router: str, backend: str, num_experts: int = NUM_EXPERTS):
    from moe.config import ModelConfig, MoEConfig, RouterConfig

    return ModelConfig(
        vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32,
        max_position_embeddings=S,
        moe=MoEConfig(num_experts=num_experts, expert_hidden_size=8, backend=backend,
                      router=RouterConfig(name=router, **{"top_k": 2, **ROUTER_SETTINGS.get(router, {})})))


def _forward_backward(model, ids_BS: torch.Tensor, g_BSV: torch.Tensor) -> torch.Tensor:
    """logits, after backpropagating Σ logits·g (a loss whose gradient is g exactly, on every row)."""
    logits = model(ids_BS).logits
    (logits * g_BSV).sum().backward()
    return logits.detach()


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0


def _parity(rank: int, groups, router: str, backend: str) -> dict:
    from moe.model import MoEModel
    from moe.parallel.expert_parallel import apply_expert_parallel, is_expert_param

    P, r = groups.ep_size, groups.ep_rank
    X = NUM_EXPERTS // P
    torch.manual_seed(0)
    full = MoEModel(_config(router, backend)).train(router not in EVAL_MODE)
    model = apply_expert_parallel(copy.deepcopy(full), groups.ep_group)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (WORLD * B, S), generator=gen)
    g = torch.randn(WORLD * B, S, V, generator=gen)

    lo, hi = groups.ep_ranks[0] * B, (groups.ep_ranks[-1] + 1) * B  # the EP group's micro-batches
    ref_logits = _forward_backward(full, ids[lo:hi], g[lo:hi])
    logits = _forward_backward(model, ids[rank * B:(rank + 1) * B], g[rank * B:(rank + 1) * B])
    out = {"logits_bitwise": torch.equal(logits, ref_logits[rank * B - lo:(rank + 1) * B - lo]),
           "expert_grads_not_bitwise": [], "dense_max_rel": 0.0, "dense_not_close": [], "tags": []}

    ref_params = dict(full.named_parameters())
    edp_expert_grads, world_dense_grads = {}, {}
    for name, p in model.named_parameters():
        ref = ref_params[name]
        if is_expert_param(p):
            out["tags"].append([name, p.group_name, list(p.shape)])
            if not torch.equal(p.grad, ref.grad[r * X:(r + 1) * X]):
                out["expert_grads_not_bitwise"].append([name, _max_rel(p.grad, ref.grad[r * X:(r + 1) * X])])
            edp_expert_grads[name] = p.grad.clone()
        else:
            world_dense_grads[name] = p.grad.clone()
            dist.all_reduce(p.grad, group=groups.ep_group)  # data parallelism over the EP group's batches
            rel = _max_rel(p.grad, ref.grad)
            out["dense_max_rel"] = max(out["dense_max_rel"], rel)
            if not torch.allclose(p.grad, ref.grad, rtol=1e-5, atol=1e-5 * float(ref.grad.abs().max())):
                out["dense_not_close"].append([name, rel])

    if P < WORLD and router == "topk":
        # Whole-world data parallelism: expert gradients reduced over the expert-data-parallel group, the rest
        # over the world, equal (same tolerance, same reason) to one process running all WORLD micro-batches.
        full.zero_grad()
        _forward_backward(full, ids, g)
        out["world_max_rel"], out["world_not_close"] = 0.0, []
        for name, grad in {**edp_expert_grads, **world_dense_grads}.items():
            expert = name in edp_expert_grads
            dist.all_reduce(grad, group=groups.edp_group if expert else None)
            ref = ref_params[name].grad[r * X:(r + 1) * X] if expert else ref_params[name].grad
            rel = _max_rel(grad, ref)
            out["world_max_rel"] = max(out["world_max_rel"], rel)
            if not torch.allclose(grad, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())):
                out["world_not_close"].append([name, rel])
    return out


def _zero_token_dispatch(rank: int, group, backend: str) -> dict:
    """Hand-made assignments on EP 4 (one expert per rank): rank 1 has no tokens at all, every token of
    rank 2 goes to expert 0, and nobody routes to expert 3, so rank 3 receives nothing. Output, input and
    weight gradients must equal the single process running all ranks' assignments."""
    from moe.experts import Experts
    from moe.parallel.dispatcher import ExpertParallelDispatcher

    E, D, F = 4, 16, 8
    tokens = [5, 0, 3, 2]
    experts_of = [[0, 2, 1, 1, 0], [], [0, 0, 0], [2, 1]]  # one assignment per token, plus a second below
    torch.manual_seed(2)
    full = Experts(E, D, F, backend)
    xs = [torch.randn(t, D) for t in tokens]
    gs = []
    assignments = []  # per rank: (token, expert) grouped by expert, stable
    for rank_i, ex in enumerate(experts_of):
        pairs = [(t, e) for t, e in enumerate(ex)] + [(t, 1) for t, e in enumerate(ex) if rank_i == 0 and e != 1]
        pairs.sort(key=lambda te: te[1])
        assignments.append(pairs)
        gs.append(torch.randn(len(pairs), D))

    # Single process: all ranks' tokens concatenated; each expert's rows in (rank, token) order.
    offsets = [sum(tokens[:i]) for i in range(len(tokens))]
    x_all = torch.cat(xs).requires_grad_(True)
    order = sorted(((e, i, a) for i, pairs in enumerate(assignments) for a, (_, e) in enumerate(pairs)))
    rows = torch.tensor([offsets[i] + assignments[i][a][0] for e, i, a in order], dtype=torch.int64)
    counts = torch.bincount(torch.tensor([e for e, _, _ in order], dtype=torch.int64), minlength=E)
    y_all = full(x_all, rows, counts)
    g_all = torch.stack([gs[i][a] for e, i, a in order])
    (y_all * g_all).sum().backward()
    y_ref = {(i, a): y_all[j] for j, (e, i, a) in enumerate(order)}

    # Expert parallel: each rank its own assignments, its one expert.
    dispatcher = ExpertParallelDispatcher(group, E)
    local = copy.deepcopy(full)
    local.w_gate_up_ED2F = torch.nn.Parameter(full.w_gate_up_ED2F.detach()[rank:rank + 1].clone())
    local.w_down_EFD = torch.nn.Parameter(full.w_down_EFD.detach()[rank:rank + 1].clone())
    local.num_experts = 1
    x = xs[rank].clone().requires_grad_(True)
    pairs = assignments[rank]
    rows_A = torch.tensor([t for t, _ in pairs], dtype=torch.int64)
    counts_E = torch.bincount(torch.tensor([e for _, e in pairs], dtype=torch.int64), minlength=E)
    y = dispatcher.expert_outputs(local, x, rows_A, counts_E)
    (y * gs[rank]).sum().backward()
    want_y = torch.stack([y_ref[(rank, a)] for a in range(len(pairs))]) if pairs else y_all.new_zeros(0, D)
    lo = offsets[rank]
    return {
        "received": int(torch.bincount(torch.tensor([e for e, _, _ in order]), minlength=E)[rank]),
        "y_bitwise": torch.equal(y, want_y),
        "x_grad_bitwise": torch.equal(x.grad, x_all.grad[lo:lo + tokens[rank]]),
        "w_grad_bitwise": torch.equal(local.w_gate_up_ED2F.grad, full.w_gate_up_ED2F.grad[rank:rank + 1])
        and torch.equal(local.w_down_EFD.grad, full.w_down_EFD.grad[rank:rank + 1]),
    }


def _errors(rank: int, group) -> dict:
    from moe.model import MoEModel
    from moe.parallel.expert_parallel import apply_expert_parallel

    out = {}
    try:
        apply_expert_parallel(MoEModel(_config("topk", "torch", num_experts=6)), group)
    except ValueError as e:
        out["indivisible"] = str(e)
    model = apply_expert_parallel(MoEModel(_config("topk", "torch")), group)
    copied = copy.deepcopy(model)  # a copy (an EMA, say) keeps the group
    out["deepcopy_shares_dispatcher"] = copied.layers[0].mlp.dispatcher is model.layers[0].mlp.dispatcher
    try:
        apply_expert_parallel(model, group)
    except ValueError as e:
        out["twice"] = str(e)
    return out


def expert_parallel_checks(rank: int, world_size: int, cases: list[list[str]]) -> dict:
    from moe.parallel.groups import build_expert_parallel_groups

    assert world_size == WORLD
    out: dict = {"parity": {}, "groups": {}}
    for P in EP_SIZES:  # every rank builds every group, in the same order (new_group is collective)
        groups = build_expert_parallel_groups(WORLD, rank, P, NUM_EXPERTS)
        out["groups"][P] = [list(groups.ep_ranks), list(groups.edp_ranks), groups.ep_rank]
        for router, backend, case_P in cases:
            if case_P == P:
                out["parity"][f"{router}/{backend}/{P}"] = _parity(rank, groups, router, backend)
        if P == WORLD:
            out["zero_tokens"] = {backend: _zero_token_dispatch(rank, groups.ep_group, backend)
                                  for backend in ("torch", "reference")}
            out["errors"] = _errors(rank, groups.ep_group)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed("tests.parallel.test_expert_parallel:expert_parallel_checks", WORLD,
                           tmp_path_factory.mktemp("ep"), timeout=120, cases=CASES)


@pytest.mark.parametrize("router, backend, ep_size", CASES)
def test_expert_parallel_equals_single_process(results, router, backend, ep_size):
    for rank, res in enumerate(results):
        got = res["parity"][f"{router}/{backend}/{ep_size}"]
        print(f"{router}/{backend} ep={ep_size} rank {rank}: dense grads max rel diff {got['dense_max_rel']:.1e}"
              + (f", whole world {got['world_max_rel']:.1e}" if "world_max_rel" in got else ""))
        assert got["logits_bitwise"], (rank, "logits differ")
        assert got["expert_grads_not_bitwise"] == [], (rank, got["expert_grads_not_bitwise"])
        assert got["dense_not_close"] == [], (rank, got["dense_not_close"])
        assert got.get("world_not_close", []) == [], (rank, got["world_not_close"])
        # exactly the expert weights carry DeepSpeed's tags, with their local shapes
        X = NUM_EXPERTS // ep_size
        assert got["tags"] == [[f"layers.{i}.mlp.experts.{w}", f"ep_size_{ep_size}", shape]
                               for i in range(2) for w, shape in (("w_gate_up_ED2F", [X, 16, 16]),
                                                                  ("w_down_EFD", [X, 8, 16]))]


def test_groups_nest_expert_parallel_inside_data_parallel(results):
    from moe.parallel.groups import expert_parallel_layout

    for P in EP_SIZES:
        ep_groups, edp_groups = expert_parallel_layout(WORLD, P)
        for rank, res in enumerate(results):
            ep_ranks, edp_ranks, ep_rank = res["groups"][str(P)]
            assert ep_ranks == ep_groups[rank // P] and edp_ranks == edp_groups[rank % P] and ep_rank == rank % P


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_ranks_with_no_tokens_do_not_hang_and_stay_exact(results, backend):
    assert [res["zero_tokens"][backend]["received"] for res in results] == [5, 6, 2, 0]
    for rank, res in enumerate(results):
        got = res["zero_tokens"][backend]
        assert got["y_bitwise"] and got["x_grad_bitwise"] and got["w_grad_bitwise"], (rank, got)


def test_bad_ep_sizes_are_value_errors(results):
    for res in results:
        assert "num_experts 6 is not divisible by ep_size 4" in res["errors"]["indivisible"]
        assert "already expert-parallel" in res["errors"]["twice"]
        assert res["errors"]["deepcopy_shares_dispatcher"]
