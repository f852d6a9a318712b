"""The MoE feed-forward layer: route -> dispatch -> experts -> combine.

Shape legend: B batch, S sequence, T = B·S tokens, D model width, E experts, A assignments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moe.kernels import reference
from moe.config import MoEConfig
from moe.experts import Experts
from moe.ffn import SwiGLU
from moe.routing.base import Routing
from moe.routing.registry import build_router

# Step 3's seam: ``(experts, x_TD, rows_A, counts_E) -> y_AD``, the expert outputs of the grouped assignments
# in their grouped order. On one device it is ``run_local_experts``; ``moe.parallel.expert_moe.parallel.expert_parallel.apply_expert_parallel``
# installs one that sends the rows to the ranks owning their experts and brings the outputs back.
Dispatcher = Callable[[Experts, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def run_local_experts(experts: Experts, x_TD: torch.Tensor, rows_A: torch.Tensor,
                      counts_E: torch.Tensor) -> torch.Tensor:
    """The single-device dispatcher: every expert is here, so the rows go straight to the grouped GEMMs."""
    return experts(x_TD, rows_A, counts_E)


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
        # Where step 3 runs the experts (see ``Dispatcher``); replaced after construction for expert parallelism.
        self.dispatcher: Dispatcher = run_local_experts

    def forward(self, x_BSD: torch.Tensor, token_ids_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """Returns the layer output (B, S, D) and the routing decision (its losses and stats)."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        token_ids_T = None if token_ids_BS is None else token_ids_BS.reshape(B * S)

        # 1. Route: a flat list of (token, expert, weight) assignments.
        routing = self.router(x_TD, token_ids_T, S)

        # 2. Dispatch: group the assignments by expert (stable, so each expert sees its tokens in order).
        with torch.no_grad():
            order_A = torch.argsort(routing.expert_index, stable=True)
            rows_A = routing.token_index.index_select(0, order_A)
        weight_A = routing.weight.index_select(0, order_A)

        # 3+4. Experts and combine: out[token] += weight · expert(x[token]), accumulated in fp32. On one device
        #    the backend runs them as one block (on a CPU the tiled kernel fuses gather, GEMMs and scatter);
        #    under expert parallelism the dispatcher moves the rows to the experts' ranks and the outputs back.
        grad_scale_A = None
        if routing.expert_grad_scale is not None:
            grad_scale_A = routing.expert_grad_scale.index_select(0, order_A)
        if self.dispatcher is run_local_experts:
            out_TD = self.experts.forward_combine(x_TD, rows_A, weight_A, routing.tokens_per_expert, grad_scale_A)
        else:
            y_AD = self.dispatcher(self.experts, x_TD, rows_A, routing.tokens_per_expert)
            if grad_scale_A is not None:
                y_AD = reference.scale_grad(y_AD, grad_scale_A.unsqueeze(1))
            out_TD = reference.scatter_combine(y_AD, rows_A, weight_A, B * S)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD  # (T, 1) gate per token
            out_TD = out_TD + shared_TD
        return out_TD.reshape(B, S, D), routing
