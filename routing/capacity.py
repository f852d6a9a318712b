"""Expert capacity for token-choice routers (docs/routers.md#capacity).

Shape legend: T tokens, E experts, K slots per token.

Priority: all first choices before any second choice (rank-major), and within a rank earlier tokens first,
so for a causal model a token is never dropped because of a later token of its own rank.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(capacity_factor: float, top_k: int, num_tokens: int, num_experts: int, min_capacity: int) -> int:
    """``C = max(min_capacity, ceil(cf · k · T / E))``."""
    return max(min_capacity, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


@torch.no_grad()
def capacity_keep_mask(indices_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments fit in their expert's ``capacity`` slots, in rank-major, token-order priority.

    Args:
        indices_TK: (T, K) chosen experts, all valid (>= 0).
        num_experts: E.
        capacity: C, slots per expert.
    Returns:
        (T, K) bool, True where the assignment is kept.
    """
    T, K = indices_TK.shape
    flat_A = indices_TK.t().reshape(-1)  # (K*T,) rank-major: every first choice precedes every second
    order_A = torch.argsort(flat_A, stable=True)
    counts_E = torch.bincount(flat_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    position_sorted = torch.arange(flat_A.numel(), device=flat_A.device) - starts_E[flat_A[order_A]]
    position_A = torch.empty_like(position_sorted)
    position_A[order_A] = position_sorted
    return (position_A < capacity).reshape(K, T).t()
