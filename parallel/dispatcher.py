"""The expert-parallel dispatcher: rows go to the rank that owns their expert, the outputs come back, and they
are combined.

Shape legend: T tokens, D model width, E experts, P ranks in the expert-parallel group, X = E/P experts per
rank, A assignments made on this rank (grouped by expert), R rows received by this rank.

It consumes only the grouped assignments that ``moe.layer.MoELayer`` hands to its dispatcher (rows sorted by
global expert, their weights, and the per-expert counts), so it works for every router behind ``moe.routing.base.Routing``: top-k,
expert choice, hash, GRIN, adaptive. Rank r owns experts ``[r·X, (r+1)·X)``.

    x_TD --gather rows_A--> x_AD      grouped by global expert = grouped by destination rank
         --exchange counts (P, E)-->  what every rank sends to every expert
         --all-to-all-->     x_RD     grouped by source rank, then by local expert
         --experts(x_RD, order_R)-->  y (R, D) grouped by local expert (the permutation fused into the gather)
         --unpermute-->      y_RD     grouped by source rank again
         --all-to-all back-> y_AD     in this rank's grouped order
         --combine-->        out_TD   out[rows_A[a]] += weight_A[a] · y_AD[a], in fp32 (``scatter_combine``)

Each expert sees its rows in (source rank, token) order: exactly the order a single process holding all
experts would give it for the concatenation of the ranks' batches, which is why outputs and expert gradients
can match the single process bit for bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe.experts import Experts
from moe.kernels.permute import inverse_permutation, source_to_expert_order
from moe.kernels.reference import scale_grad, scatter_combine
from moe.parallel.all_to_all import all_to_all, exchange_counts


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

    def __call__(self, experts: Experts, x_TD: torch.Tensor, rows_A: torch.Tensor, weight_A: torch.Tensor,
                 counts_E: torch.Tensor, grad_scale_A: torch.Tensor | None) -> torch.Tensor:
        """``moe.layer.Dispatcher``: the combined output (T, D) of this rank's grouped assignments, their experts
        run wherever they live."""
        y_AD = self.expert_outputs(experts, x_TD, rows_A, counts_E)
        if grad_scale_A is not None:
            y_AD = scale_grad(y_AD, grad_scale_A.unsqueeze(1))
        return scatter_combine(y_AD, rows_A, weight_A, x_TD.shape[0])

    def expert_outputs(self, experts: Experts, x_TD: torch.Tensor, rows_A: torch.Tensor,
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
        x_RD = all_to_all(x_AD, send_splits, recv_splits, self.group)  # (R, D) by source, then local expert
        # The regrouping gather is fused into the GEMM. NOTE: with no rows received the output is empty but still
        # depends on x_RD and the weights (every backend keeps zero-row results in the graph), so this rank's
        # backward runs the reverse exchange its peers wait for.
        y_by_expert_RD = experts(x_RD, order_R, recv_PX.sum(0))
        y_RD = y_by_expert_RD.index_select(0, inverse_permutation(order_R))  # back to (source, local expert) order
        return all_to_all(y_RD, recv_splits, send_splits, self.group)  # (A, D) in this rank's grouped order

    def __deepcopy__(self, memo: dict) -> "ExpertParallelDispatcher":
        # A process group is a handle to shared communicators, not data: a copied model (an EMA, a reference
        # copy) keeps using the same group, and so the same dispatcher.
        return self

    def __repr__(self) -> str:
        return (f"ExpertParallelDispatcher(ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"local_experts={self.local_experts.start}..{self.local_experts.stop - 1})")
