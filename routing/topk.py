"""Token-choice top-k router with softmax (ROUTERS.md §1.1, §1.2).

Shape legend: T tokens, D model width, E experts, K = top_k slots per token, A assignments.

``renormalize=True`` is Mixtral's top-k-then-softmax (the selected probabilities divided by their sum);
``False`` is softmax-then-top-k (Switch, the NVIDIA upcycling study), where every logit gets gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from routing.base import Router, Routing, router_dtype, routing_stats
from routing.capacity import capacity_keep_mask, expert_capacity
from routing.losses import load_balancing_loss, z_loss


class TopKRouter(Router):
    """Linear router ``z = W x``, softmax in fp32, top-k with ties broken towards the lower expert index.

    Args:
        hidden_size: D.
        num_experts: E.
        top_k: K.
        renormalize: divide the selected probabilities by their sum.
        aux_loss_coef: α of the Switch load-balancing loss (0 disables it).
        lb_f_normalization: how its ``f`` is normalised (ROUTERS.md §0.4a).
        z_loss_coef: β of the router z-loss (0 disables it).
        capacity_factor: None for dropless; else the training capacity factor.
        eval_capacity_factor: capacity factor in ``eval()`` mode (None: dropless).
        min_capacity: lower bound on the slots per expert.
        init_std: std of the normal init of ``W``.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool = True,
        aux_loss_coef: float = 0.01,
        lb_f_normalization: str = "assignments",
        z_loss_coef: float = 0.0,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.aux_loss_coef = aux_loss_coef
        self.lb_f_normalization = lb_f_normalization
        self.z_loss_coef = z_loss_coef
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))  # (E, D), like nn.Linear
        self.reset_parameters()

    @classmethod
    def from_config(cls, moe_cfg, hidden_size: int) -> "TopKRouter":
        rc = moe_cfg.router
        return cls(
            hidden_size=hidden_size,
            num_experts=moe_cfg.num_experts,
            top_k=rc.top_k,
            renormalize=rc.renormalize,
            aux_loss_coef=rc.aux_loss_coef,
            lb_f_normalization=rc.lb_f_normalization,
            z_loss_coef=rc.z_loss_coef,
            capacity_factor=moe_cfg.capacity_factor,
            eval_capacity_factor=moe_cfg.eval_capacity_factor,
            min_capacity=moe_cfg.min_capacity,
            init_std=rc.init_std,
        )

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                seq_len: int | None = None) -> Routing:
        T = x_TD.shape[0]
        E, K = self.num_experts, self.top_k
        # NOTE: router maths in fp32 (Switch Transformer): bf16 logits create ties and wrong top-k choices.
        # Autocast is switched off here, or it would run the matmul in bf16 again. float64 stays float64
        # so that gradients can be checked exactly.
        dtype = router_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = nn.functional.linear(x_TD.to(dtype), self.weight.to(dtype))
            probs_TE = torch.softmax(logits_TE, dim=-1)
        with torch.no_grad():
            # A stable descending sort breaks ties towards the lower index, which torch.topk does not promise.
            indices_TK = torch.sort(probs_TE, dim=-1, descending=True, stable=True).indices[:, :K]
        if self.renormalize:
            # softmax over the selected logits == selected probabilities / their sum (the full normaliser
            # cancels), and for k=1 it is exactly 1 with exactly zero gradient, as ROUTERS.md §1.2 states.
            weights_TK = torch.softmax(logits_TE.gather(1, indices_TK), dim=-1)
        else:
            weights_TK = probs_TE.gather(1, indices_TK)

        losses: dict[str, torch.Tensor] = {}
        if self.aux_loss_coef > 0:
            lb = load_balancing_loss(probs_TE, indices_TK, E, self.lb_f_normalization)  # type: ignore[arg-type]
            losses["load_balancing"] = self.aux_loss_coef * lb
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * z_loss(logits_TE)

        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        token_TK = torch.arange(T, device=x_TD.device).unsqueeze(1).expand(T, K)
        if cf is None:
            token_A, expert_A, weight_A = token_TK.reshape(-1), indices_TK.reshape(-1), weights_TK.reshape(-1)
            dropped = 0
        else:
            capacity = expert_capacity(cf, K, T, E, self.min_capacity)
            keep_TK = capacity_keep_mask(indices_TK, E, capacity)
            token_A, expert_A, weight_A = token_TK[keep_TK], indices_TK[keep_TK], weights_TK[keep_TK]
            dropped = T * K - token_A.numel()
        with torch.no_grad():
            tokens_per_expert_E = torch.bincount(expert_A, minlength=E)
        return Routing(
            token_index=token_A,
            expert_index=expert_A,
            weight=weight_A,
            tokens_per_expert=tokens_per_expert_E,
            losses=losses,
            stats=routing_stats(probs_TE, tokens_per_expert_E, T, dropped=dropped),
        )
