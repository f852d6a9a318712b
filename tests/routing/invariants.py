"""The invariants every router must satisfy (docs/routers.md#routing-invariants), one function each router's
tests call."""

from __future__ import annotations

import torch

from moe.routing.base import Router, Routing


def check_routing_invariants(router: Router, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
    T = x_TD.shape[0]
    E = router.num_experts
    routing = router(x_TD, token_ids_T)
    A = routing.token_index.numel()
    assert routing.token_index.dtype == torch.int64 and routing.expert_index.dtype == torch.int64
    assert routing.expert_index.shape == (A,) and routing.weight.shape == (A,)
    assert routing.weight.dtype == torch.promote_types(x_TD.dtype, torch.float32), "combine weights must be fp32"
    assert torch.isfinite(routing.weight).all() and (routing.weight >= 0).all()
    if A:
        assert 0 <= int(routing.token_index.min()) and int(routing.token_index.max()) < T
        assert 0 <= int(routing.expert_index.min()) and int(routing.expert_index.max()) < E
    # no duplicate (token, expert) pair
    pairs = routing.token_index * E + routing.expert_index
    assert pairs.unique().numel() == A, "a token is assigned to the same expert twice"
    assert torch.equal(routing.tokens_per_expert, torch.bincount(routing.expert_index, minlength=E))
    for name, loss in routing.losses.items():
        assert loss.dim() == 0 and torch.isfinite(loss), name
    for name, stat in routing.stats.items():
        assert not stat.requires_grad, f"stat {name} must be detached"
    for key in ("tokens_per_expert", "dropped_fraction", "max_load_ratio", "experts_per_token"):
        assert key in routing.stats, key

    # eval mode is deterministic, bit for bit
    was_training = router.training
    router.eval()
    a, b = router(x_TD, token_ids_T), router(x_TD, token_ids_T)
    assert torch.equal(a.token_index, b.token_index) and torch.equal(a.expert_index, b.expert_index)
    assert torch.equal(a.weight, b.weight)
    # fp32 router maths even under bf16 autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = router(x_TD.to(torch.bfloat16), token_ids_T)
    assert c.weight.dtype == torch.float32
    router.train(was_training)
    return routing
