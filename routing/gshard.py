"""GShard top-2 routing with the second-expert policies of Mesh-TF / Lingvo (ROUTERS.md §1.5).

Shape legend: T tokens, D model width, E experts, K = 2 slots per token, A assignments.

    p  = softmax(z),   i1 = argmax p,   i2 = argmax_{e≠i1} p    (policy "sampling": i2 ~ softmax(z | z_i1 = −∞))
    legacy (normalize_before_policy):  ĝ = (p_i1, p_i2) / (p_i1 + p_i2), BEFORE the policy and before dropping
    policy  all: keep i2 | none: drop i2 | threshold: keep iff ĝ2 > τ | random: keep iff U(0,1) < ĝ2/τ
            sampling: keep the sampled i2

A second choice that the policy does not keep leaves its slot empty, takes no capacity, and (legacy) ĝ1 is
not renormalised to 1: the token's output is scaled by ĝ1 < 1. With ``normalize_before_policy=False``
(Lingvo's non-legacy path) the test uses the raw ``p_i2`` and the weights are renormalised over the
choices that survive the policy and capacity. Capacity is rank-major: all first choices before any second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from routing.base import Router, Routing, router_dtype
from routing.jitter import Jitter, gumbel_noise
from routing.losses import load_balancing_loss, z_loss
from routing.token_choice import common_router_kwargs, token_choice_routing, topk_indices

SecondPolicy = Literal["all", "random", "threshold", "sampling", "none"]
SECOND_POLICIES = ("all", "random", "threshold", "sampling", "none")


@dataclass(kw_only=True)
class GShardOptions:
    """``router.options`` of the ``gshard`` router (defaults: Mesh-TF's, except eval, which is ours)."""

    # Which second choices are kept in training (Mesh-TF: random).
    second_policy: SecondPolicy = "random"
    # ... and in eval(). Mesh-TF uses random at eval too; "all" keeps eval deterministic [D].
    second_policy_eval: SecondPolicy = "all"
    # τ2 of the threshold and random policies.
    second_threshold: float = 0.2
    # Legacy Mesh-TF: normalise (ĝ1, ĝ2) before the policy test and never again. False: test the raw p_i2
    # and renormalise over the surviving choices after dropping (Lingvo non-legacy, fairseq).
    normalize_before_policy: bool = True

    def __post_init__(self) -> None:
        for name in ("second_policy", "second_policy_eval"):
            value = getattr(self, name)
            if value not in SECOND_POLICIES:
                raise ValueError(f"router.options.{name}: {value!r} is not one of {', '.join(SECOND_POLICIES)}")
        if not 0 < self.second_threshold <= 1:
            raise ValueError(f"router.options.second_threshold must be in (0, 1], got {self.second_threshold}")


class GShardRouter(Router):
    """Top-2 softmax router of GShard with a second-expert policy.

    Args:
        hidden_size: D.
        num_experts: E (at least 2).
        top_k: must be 2.
        renormalize: must be True: GShard always normalises its two gates (``normalize_before_policy`` says when).
        aux_loss_coef: α of the load-balancing loss (GShard: 1e-2).
        lb_f_normalization: GShard counts first choices only (``"first_choice"``, the default here).
        z_loss_coef: β of the router z-loss (0 disables it).
        capacity_factor: None for dropless; else the training capacity factor (GShard: 1.25).
        eval_capacity_factor: capacity factor in ``eval()`` mode (GShard: 2.0; None: dropless).
        min_capacity: lower bound on the slots per expert.
        init_std: std of the normal init of ``W``.
        jitter: training-only noise (ROUTERS.md §1.7).
        jitter_eps: its ε.
        options: the settings of ``GShardOptions``.
    """

    Options = GShardOptions

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        renormalize: bool = True,
        aux_loss_coef: float = 0.01,
        lb_f_normalization: str = "first_choice",
        z_loss_coef: float = 0.0,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        init_std: float = 0.02,
        jitter: str = "none",
        jitter_eps: float = 1e-2,
        options: GShardOptions | None = None,
    ) -> None:
        super().__init__()
        if top_k != 2:
            raise ValueError(f"router.top_k must be 2 for the gshard router, got {top_k}")
        if num_experts < 2:
            raise ValueError(f"moe.num_experts must be >= 2 for the gshard router, got {num_experts}")
        if not renormalize:
            raise ValueError(
                "router.renormalize must be true for the gshard router: it always normalises its two gates "
                "(router.options.normalize_before_policy chooses before the policy or after dropping)"
            )
        self.num_experts = num_experts
        self.top_k = 2
        self.aux_loss_coef = aux_loss_coef
        self.lb_f_normalization = lb_f_normalization
        self.z_loss_coef = z_loss_coef
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.init_std = init_std
        self.options = options or GShardOptions()
        self.jitter = Jitter(jitter, jitter_eps)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))  # (E, D), like nn.Linear
        self.reset_parameters()

    @classmethod
    def from_config(cls, moe_cfg, hidden_size: int) -> "GShardRouter":
        return cls(**common_router_kwargs(moe_cfg, hidden_size), options=moe_cfg.router.router_options())

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                seq_len: int | None = None) -> Routing:
        E = self.num_experts
        opts = self.options
        policy = opts.second_policy if self.training else opts.second_policy_eval
        # NOTE: router maths in fp32 with autocast off (see TopKRouter); float64 stays float64 for exact tests.
        dtype = router_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            xr_TD = self.jitter.router_input(x_TD.to(dtype))
            logits_TE = self.jitter.logits(nn.functional.linear(xr_TD, self.weight.to(dtype)))
            probs_TE = torch.softmax(logits_TE, dim=-1)
            with torch.no_grad():
                sel_TE = self.jitter.selection(logits_TE)
                if policy == "sampling":
                    # Gumbel-max over softmax(z) with i1 excluded by −inf (praxis: a very negative finite value).
                    first_T1 = topk_indices(sel_TE, 1)
                    noisy_TE = logits_TE + gumbel_noise(logits_TE)
                    second_T1 = topk_indices(noisy_TE.scatter(1, first_T1, float("-inf")), 1)
                    indices_TK = torch.cat([first_T1, second_T1], dim=1)
                else:
                    indices_TK = topk_indices(sel_TE, 2)
            if opts.normalize_before_policy:
                # (p_i1, p_i2) / (p_i1 + p_i2) == softmax over the two selected logits: the full normaliser
                # cancels, so only these two logits get task gradient. NOTE: Mesh-TF adds 1e-9 to the
                # denominator; two finite logits never need it, and without it the cancellation is exact.
                gates_TK = torch.softmax(logits_TE.gather(1, indices_TK), dim=-1)
            else:
                gates_TK = probs_TE.gather(1, indices_TK)

        with torch.no_grad():
            g2_T = gates_TK[:, 1]
            if policy in ("all", "sampling"):
                keep2_T = torch.ones_like(g2_T, dtype=torch.bool)
            elif policy == "none":
                keep2_T = torch.zeros_like(g2_T, dtype=torch.bool)
            elif policy == "threshold":
                keep2_T = g2_T > opts.second_threshold
            else:  # random: kept with probability min(1, g2/τ)
                keep2_T = torch.rand_like(g2_T) < g2_T / opts.second_threshold
            indices_TK = torch.stack([indices_TK[:, 0], torch.where(keep2_T, indices_TK[:, 1], -1)], dim=1)

        losses: dict[str, torch.Tensor] = {}
        if self.aux_loss_coef > 0:
            # f from the decision before capacity; GShard's "first_choice" counts the i1 alone.
            lb = load_balancing_loss(probs_TE, indices_TK, E, self.lb_f_normalization)  # type: ignore[arg-type]
            losses["load_balancing"] = self.aux_loss_coef * lb
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * z_loss(logits_TE)

        return token_choice_routing(
            indices_TK,
            gates_TK,
            probs_TE,
            num_experts=E,
            capacity_factor=self.capacity_factor if self.training else self.eval_capacity_factor,
            min_capacity=self.min_capacity,
            losses=losses,
            has_empty_slots=True,
            renormalize_after_drop=not opts.normalize_before_policy,
            per_rank_stats=True,
            extra_stats={"second_expert_keep_rate": keep2_T.float().mean()},
        )
