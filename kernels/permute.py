"""Permutations that group assignments by expert and undo it.

Shape legend: A assignments, E experts, P ranks in an expert-parallel group, X = E/P experts per rank, R rows
received by a rank. Index bookkeeping only: no gradient flows through these (the rows they move are gathered
with ``index_select`` by the caller, which is differentiable).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sort_by_expert(expert_index_A: torch.Tensor) -> torch.Tensor:
    """The stable order that groups assignments by expert: each expert sees its assignments in their original
    order (a token's position in the batch).

    Args:
        expert_index_A: (A,) int64 expert of each assignment.
    Returns:
        order_A: (A,) int64; ``expert_index_A[order_A]`` is sorted, ties kept in order.
    """
    return torch.argsort(expert_index_A, stable=True)


@torch.no_grad()
def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``inverse`` with ``inverse[order[j]] = j``: gathering with it undoes a gather with ``order``."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


@torch.no_grad()
def source_to_expert_order(recv_counts_PX: torch.Tensor) -> torch.Tensor:
    """The permutation that regroups received rows from (source rank, local expert) to (local expert, source).

    Args:
        recv_counts_PX: (P, X) rows received from each source rank for each local expert.
    Returns:
        order_R: (R,) int64; row ``order_R[j]`` of the source-major block is row j of the expert-major one.
    """
    P, X = recv_counts_PX.shape
    chunk_R = torch.repeat_interleave(torch.arange(P * X, device=recv_counts_PX.device), recv_counts_PX.reshape(-1))
    source_R, expert_R = chunk_R // X, chunk_R % X
    return torch.argsort(expert_R * P + source_R, stable=True)
