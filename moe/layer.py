"""The MoE feed-forward layer: route -> dispatch -> experts -> combine.

Shape legend: B batch, S sequence, T = B·S tokens, D model width, E experts, A assignments.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from moe.kernels.permute import sort_by_expert
from moe.config import MoEConfig
from moe.experts import Experts
from moe.ffn import SwiGLU
from moe.routing.base import Routing
from moe.routing.registry import build_router

class Dispatcher(Protocol):
    """Steps 3 and 4, the seam between routing and the experts: ``out[rows_A[a]] += weight_A[a] ·
    expert_e(x_TD[rows_A[a]])`` for assignments grouped by expert, accumulated in fp32.

    On one device it is ``LocalDispatcher``; ``moe.parallel.expert_parallel.apply_expert_parallel`` installs one
    that sends the rows to the ranks owning their experts and brings the outputs back before combining.

    Args:
        experts: this rank's experts.
        x_TD: (T, D) token activations.
        rows_A: (A,) int64 token of each assignment, grouped by (global) expert.
        weight_A: (A,) combine weight of each assignment.
        counts_E: (E,) int64 assignments per (global) expert.
        grad_scale_A: (A,) or None: multiplies the gradient reaching the experts through each assignment
            (``Routing.expert_grad_scale``).
    Returns:
        out_TD: (T, D) in the dtype of ``x_TD``.
    """

    def __call__(self, experts: Experts, x_TD: torch.Tensor, rows_A: torch.Tensor, weight_A: torch.Tensor,
                 counts_E: torch.Tensor, grad_scale_A: torch.Tensor | None) -> torch.Tensor: ...


class LocalDispatcher:
    """Every expert is here: the backend runs experts and combine as one block (``moe.kernels.ops.experts_combine``;
    on a CPU the tiled kernel fuses gather, GEMMs and scatter)."""

    def __call__(self, experts: Experts, x_TD: torch.Tensor, rows_A: torch.Tensor, weight_A: torch.Tensor,
                 counts_E: torch.Tensor, grad_scale_A: torch.Tensor | None) -> torch.Tensor:
        return experts.forward_combine(x_TD, rows_A, weight_A, counts_E, grad_scale_A)

    def __repr__(self) -> str:
        return "LocalDispatcher()"


class MoELayer(nn.Module):
    """Routed SwiGLU experts, plus optional always-on shared experts.

    Args:
        cfg: the MoE settings.
        hidden_size: D.
        init_std: std of the normal init of the expert weights.
    """

    def __init__(self, cfg: MoEConfig, hidden_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.router = build_router(cfg, hidden_size)
        self.experts = Experts(cfg.num_experts, hidden_size, cfg.expert_hidden_size, cfg.backend, init_std)
        self.shared_experts = SwiGLU(hidden_size, cfg.shared_hidden_size) if cfg.num_shared_experts else None
        # Qwen2-MoE's sigmoid gate on the shared experts' output (``moe.shared_expert_gate``); None: ungated.
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if cfg.shared_expert_gate else None
        # Where steps 3 and 4 run (see ``Dispatcher``); replaced after construction for expert parallelism.
        self.dispatcher: Dispatcher = LocalDispatcher()

    def forward(self, x_BSD: torch.Tensor, token_ids_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """Returns the layer output (B, S, D) and the routing decision (its losses and stats)."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        token_ids_T = None if token_ids_BS is None else token_ids_BS.reshape(B * S)

        # 1. Route: a flat list of (token, expert, weight) assignments.
        routing = self.router(x_TD, token_ids_T, S)

        # 2. Dispatch: group the assignments by expert (stable, so each expert sees its tokens in order).
        order_A = sort_by_expert(routing.expert_index)
        with torch.no_grad():
            rows_A = routing.token_index.index_select(0, order_A)
        weight_A = routing.weight.index_select(0, order_A)
        grad_scale_A = None
        if routing.expert_grad_scale is not None:
            grad_scale_A = routing.expert_grad_scale.index_select(0, order_A)

        # 3+4. Experts and combine: out[token] += weight · expert(x[token]), accumulated in fp32, wherever the
        #    experts live (the dispatcher: one device, or exchanged with the ranks that hold them).
        out_TD = self.dispatcher(self.experts, x_TD, rows_A, weight_A, routing.tokens_per_expert, grad_scale_A)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD  # (T, 1) gate per token
            out_TD = out_TD + shared_TD
        return out_TD.reshape(B, S, D), routing
