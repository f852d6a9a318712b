"""The part every token-choice router shares: pick the top-k, then turn ``(indices_TK, weights_TK)`` plus
capacity into a ``Routing`` (ROUTERS.md §0.2, §0.5, §0.6).

Shape legend: T tokens, E experts, K slots per token, A assignments.

A slot holding ``-1`` is empty (e.g. a GShard second choice that its policy did not keep): it takes no
expert slot, is not an assignment and is not counted as dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from routing.base import Routing, loss_overrides, routing_stats
from routing.capacity import capacity_keep_mask, expert_capacity


def common_router_kwargs(moe_cfg: Any, hidden_size: int) -> dict[str, Any]:
    """The constructor arguments every token-choice router reads from ``moe.config.MoEConfig`` and its
    ``RouterConfig`` (typed loosely so this package does not import ``moe``)."""
    rc = moe_cfg.router
    return dict(
        hidden_size=hidden_size,
        num_experts=moe_cfg.num_experts,
        top_k=rc.top_k,
        renormalize=rc.renormalize,
        z_loss_coef=rc.z_loss_coef,
        capacity_factor=moe_cfg.capacity_factor,
        eval_capacity_factor=moe_cfg.eval_capacity_factor,
        min_capacity=moe_cfg.min_capacity,
        init_std=rc.init_std,
        jitter=rc.jitter,
        jitter_eps=rc.jitter_eps,
        **loss_overrides(rc),
    )


@torch.no_grad()
def topk_indices(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """(T, k) indices of the k largest scores per row, ties broken towards the lower expert index.

    A stable descending sort gives the tie-break that ``torch.topk`` does not promise (ROUTERS.md §0.1);
    ``-inf`` scores sort last.
    """
    return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices[:, :k]


def token_choice_routing(
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    probs_TE: torch.Tensor | None,
    *,
    num_experts: int,
    capacity_factor: float | None,
    min_capacity: int,
    losses: dict[str, torch.Tensor],
    has_empty_slots: bool = False,
    renormalize_after_drop: bool = False,
    per_rank_stats: bool = False,
    extra_stats: dict[str, torch.Tensor] | None = None,
) -> Routing:
    """The assignments of a token-choice decision, after capacity (or dropless when ``capacity_factor`` is None).

    Capacity ``C = max(min_capacity, ceil(cf·K·T/E))``; priority is rank-major, then token order, so second
    choices never displace first choices and no token is dropped because of a later token of its rank.
    Surviving weights are not renormalized (legacy Mesh-TF) unless ``renormalize_after_drop``.

    Args:
        indices_TK: (T, K) chosen experts in rank order, ``-1`` for an empty slot.
        weights_TK: (T, K) combine weights (carry the gradient); ignored in empty slots.
        probs_TE: the router distribution for the entropy statistic (None: not reported).
        num_experts: E.
        capacity_factor: None for dropless.
        min_capacity: lower bound on C.
        losses: the router's losses, already multiplied by their coefficients.
        has_empty_slots: ``indices_TK`` may hold ``-1`` (False skips the checks, and a device sync, for routers
            that always fill every slot).
        renormalize_after_drop: divide each token's surviving weights by their sum (Lingvo non-legacy).
        per_rank_stats: also report ``dropped_fraction_rank{j}`` for j = 1..K.
        extra_stats: further detached statistics of the router.
    Returns:
        the ``Routing``, assignments in token-major, rank-minor order.
    """
    T, K = indices_TK.shape
    E = num_experts
    with torch.no_grad():
        valid_TK = indices_TK >= 0
        if capacity_factor is None:
            keep_TK = valid_TK
        elif has_empty_slots:
            capacity = expert_capacity(capacity_factor, K, T, E, min_capacity)
            # Empty slots go to a spare bucket E, so that they take none of the real experts' slots.
            bucketed_TK = torch.where(valid_TK, indices_TK, E)
            keep_TK = capacity_keep_mask(bucketed_TK, E + 1, capacity) & valid_TK
        else:
            keep_TK = capacity_keep_mask(indices_TK, E, expert_capacity(capacity_factor, K, T, E, min_capacity))
    if renormalize_after_drop:
        kept_w_TK = torch.where(keep_TK, weights_TK, torch.zeros_like(weights_TK))
        denom_T1 = kept_w_TK.sum(-1, keepdim=True)
        weights_TK = kept_w_TK / torch.where(denom_T1 > 0, denom_T1, torch.ones_like(denom_T1))
    token_TK = torch.arange(T, device=indices_TK.device).unsqueeze(1).expand(T, K)
    if capacity_factor is None and not has_empty_slots:
        token_A, expert_A, weight_A = token_TK.reshape(-1), indices_TK.reshape(-1), weights_TK.reshape(-1)
    else:
        token_A, expert_A, weight_A = token_TK[keep_TK], indices_TK[keep_TK], weights_TK[keep_TK]
    with torch.no_grad():
        tokens_per_expert_E = torch.bincount(expert_A, minlength=E)
        requested = int(valid_TK.sum()) if has_empty_slots else T * K
        stats = routing_stats(probs_TE, tokens_per_expert_E, T, dropped=requested - expert_A.numel(),
                              requested=requested)
        if per_rank_stats:
            for j in range(K):
                asked = valid_TK[:, j].sum()
                lost = (valid_TK[:, j] & ~keep_TK[:, j]).sum()
                stats[f"dropped_fraction_rank{j + 1}"] = lost.float() / asked.clamp(min=1).float()
        stats.update(extra_stats or {})
    return Routing(
        token_index=token_A,
        expert_index=expert_A,
        weight=weight_A,
        tokens_per_expert=tokens_per_expert_E,
        losses=losses,
        stats=stats,
    )
