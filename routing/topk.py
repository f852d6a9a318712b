"""Token-choice top-k router with softmax (ROUTERS.md §1.1, §1.2).

Shape legend: T tokens, D model width, E experts, K = top_k slots per token, A assignments.

``renormalize=True`` is Mixtral's top-k-then-softmax (the selected probabilities divided by their sum);
``False`` is softmax-then-top-k (Switch, the NVIDIA upcycling study), where every logit gets gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from routing.base import Router, Routing, router_dtype
from routing.jitter import Jitter
from routing.losses import load_balancing_loss, z_loss
from routing.token_choice import common_router_kwargs, token_choice_routing, topk_indices


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
        jitter: training-only noise, one of ``routing.jitter.JITTERS`` (ROUTERS.md §1.7).
        jitter_eps: its ε.
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
        jitter: str = "none",
        jitter_eps: float = 1e-2,
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
        self.jitter = Jitter(jitter, jitter_eps)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))  # (E, D), like nn.Linear
        self.reset_parameters()

    @classmethod
    def from_config(cls, moe_cfg, hidden_size: int) -> "TopKRouter":
        return cls(**common_router_kwargs(moe_cfg, hidden_size))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                seq_len: int | None = None) -> Routing:
        E, K = self.num_experts, self.top_k
        # NOTE: router maths in fp32 (Switch Transformer): bf16 logits create ties and wrong top-k choices.
        # Autocast is switched off here, or it would run the matmul in bf16 again. float64 stays float64
        # so that gradients can be checked exactly.
        dtype = router_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            # input_jitter makes a jittered copy for the router only; the experts keep x_TD.
            xr_TD = self.jitter.router_input(x_TD.to(dtype))
            logits_TE = self.jitter.logits(nn.functional.linear(xr_TD, self.weight.to(dtype)))
            probs_TE = torch.softmax(logits_TE, dim=-1)
        # softmax is monotone, so ranking the logits ranks the probabilities (gumbel: the noisy logits).
        indices_TK = topk_indices(self.jitter.selection(logits_TE), K)
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

        return token_choice_routing(
            indices_TK,
            weights_TK,
            probs_TE,
            num_experts=E,
            capacity_factor=self.capacity_factor if self.training else self.eval_capacity_factor,
            min_capacity=self.min_capacity,
            losses=losses,
        )
