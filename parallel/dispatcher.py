"""The expert-parallel dispatcher: rows go to the rank that owns their expert, and the outputs come back.

Shape legend: T tokens, D model width, E experts, P ranks in the expert-parallel group, X = E/P experts per
rank, A assignments made on this rank (grouped by expert), R rows received by this rank.

It consumes only the grouped assignments that ``moe.layer.MoELayer`` hands to its dispatcher (rows sorted by
global expert, and the per-expert counts), so it works for every router behind ``moe.routing.base.Routing``: top-k,
expert choice, hash, GRIN, adaptive. Rank r owns experts ``[r·X, (r+1)·X)``.

    x_TD --gather rows_A--> x_AD      grouped by global expert = grouped by destination rank
         --exchange counts (P, E)-->  what every rank sends to every expert
         --all-to-all-->     x_RD     grouped by source rank, then by local expert
         --experts(x_RD, order_R)-->  y (R, D) grouped by local expert (the permutation fused into the gather)
         --unpermute-->      y_RD     grouped by source rank again
         --all-to-all back-> y_AD     in this rank's grouped order, for the layer's combine

Each expert sees its rows in (source rank, token) order: exactly the order a single process holding all
experts would give it for the concatenation of the ranks' batches, which is why outputs and expert gradients
can match the single process bit for bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe.experts import Experts
from moe.parallel.all_to_all import all_to_all, exchange_counts


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


def _run_on_no_rows(experts: Experts, x_0D: torch.Tensor) -> torch.Tensor:
    """The experts' (0, D) output when this rank received no rows, still in the autograd graph.

    NOTE: the output must depend on the expert weights (and on ``x_0D``) so that this rank's backward
    runs the reverse exchange its peers wait for. Running the experts on zero rows would do, but torch
    2.13's ``grouped_mm`` backward fails on zero rows ("Invalid strides/sizes"); one zero row for the first
    local expert, dropped again, sidesteps it and gives the weights a gradient of exactly zero.
    """
    x_1D = torch.cat([x_0D, x_0D.new_zeros(1, x_0D.shape[1])])
    counts_X = torch.zeros(experts.num_experts, dtype=torch.int64, device=x_0D.device)
    counts_X[0] = 1
    return experts(x_1D, None, counts_X)[:0]


class ExpertParallelDispatcher:
    """A ``moe.layer.Dispatcher`` over one expert-parallel group; the experts it is given hold the local X.

    Args:
        ep_group: the P ranks that split the experts (passed in, never looked up).
        num_experts: E, which P must divide.
    """

    def __init__(self, ep_group: dist.ProcessGroup, num_experts: int) -> None:
        P = dist.get_world_size(ep_group)
        if num_experts % P:
            raise ValueError(f"num_experts {num_experts} is not divisible by the expert-parallel group size {P}")
        self.group = ep_group
        self.ep_size = P
        self.ep_rank = dist.get_rank(ep_group)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // P

    @property
    def local_experts(self) -> range:
        """The global indices of the experts this rank owns."""
        return range(self.ep_rank * self.num_local_experts, (self.ep_rank + 1) * self.num_local_experts)

    def __call__(self, experts: Experts, x_TD: torch.Tensor, rows_A: torch.Tensor,
                 counts_E: torch.Tensor) -> torch.Tensor:
        """Expert outputs (A, D) for this rank's grouped assignments, computed wherever their experts live.

        Args:
            experts: the local shard (X experts).
            x_TD: (T, D) this rank's tokens.
            rows_A: (A,) token of each assignment, grouped by global expert.
            counts_E: (E,) assignments per global expert made on this rank.
        """
        P, X = self.ep_size, self.num_local_experts
        if counts_E.numel() != self.num_experts:
            raise ValueError(f"expected counts for {self.num_experts} experts, got {counts_E.numel()}")
        if experts.w_gate_up_ED2F.shape[0] != X:
            raise ValueError(f"the experts hold {experts.w_gate_up_ED2F.shape[0]} experts, not this rank's "
                             f"{X}: shard them with moe.parallel.expert_parallel.apply_expert_parallel")
        # Rows grouped by global expert are grouped by destination rank, since rank r owns a contiguous block.
        x_AD = x_TD.index_select(0, rows_A)
        with torch.no_grad():
            send_PX = counts_E.reshape(P, X)
            recv_PX = exchange_counts(send_PX, self.group, num_rows=rows_A.numel())
            send_splits, recv_splits = send_PX.sum(1).tolist(), recv_PX.sum(1).tolist()
            order_R = source_to_expert_order(recv_PX)
            inverse_R = torch.empty_like(order_R)
            inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
            local_counts_X = recv_PX.sum(0)
        x_RD = all_to_all(x_AD, send_splits, recv_splits, self.group)  # (R, D) by source, then local expert
        if order_R.numel() == 0:
            y_RD = _run_on_no_rows(experts, x_RD)
        else:
            y_by_expert_RD = experts(x_RD, order_R, local_counts_X)  # the regrouping gather fused into the GEMM
            y_RD = y_by_expert_RD.index_select(0, inverse_R)  # back to (source, local expert) order
        return all_to_all(y_RD, recv_splits, send_splits, self.group)  # (A, D) in this rank's grouped order

    def __deepcopy__(self, memo: dict) -> "ExpertParallelDispatcher":
        # A process group is a handle to shared communicators, not data: a copied model (an EMA, a reference
        # copy) keeps using the same group, and so the same dispatcher.
        return self

    def __repr__(self) -> str:
        return (f"ExpertParallelDispatcher(ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"local_experts={self.local_experts.start}..{self.local_experts.stop - 1})")
