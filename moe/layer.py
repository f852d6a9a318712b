"""The MoE feed-forward layer: route -> dispatch -> experts -> combine.

Shape legend: B batch, S sequence, T = B·S tokens, D model width, E experts, A assignments.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from moe.config import MoEConfig
from moe.experts import Experts
from moe.ffn import SwiGLU
from routing import Routing, build_router


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

        # 3. Experts: two grouped GEMMs, the row gather fused into the first where the backend can.
        y_AD = self.experts(x_TD, rows_A, routing.tokens_per_expert)

        # 4. Combine: out[token] += weight · y, accumulated in fp32.
        out_TD = kernels.scatter_combine(y_AD, rows_A, weight_A, B * S)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        return out_TD.reshape(B, S, D), routing
