"""GShard top-2 routing with the second-expert policies of Mesh-TF / Lingvo (docs/routers.md#gshard).

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

from moe.routing.base import Routing
from moe.routing.jitter import gumbel_noise
from moe.routing.token_choice import TokenChoiceRouter, token_choice_routing, topk_indices

SecondPolicy = Literal["all", "random", "threshold", "sampling", "none"]
SECOND_POLICIES = ("all", "random", "threshold", "sampling", "none")


@dataclass(kw_only=True)
class GShardOptions:
    """``router.options`` of the ``gshard`` router (defaults: Mesh-TF's, except eval, which is ours)."""

    # Which second choices are kept in training (Mesh-TF: random).
    second_policy: SecondPolicy = "random"
    # ... and in eval(). Mesh-TF uses random at eval too; "all" keeps eval deterministic (our choice).
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


class GShardRouter(TokenChoiceRouter):
    """Top-2 softmax router of GShard with a second-expert policy.

    Args:
        num_experts: E (at least 2).
        top_k: must be 2.
        renormalize: must be True: GShard always normalises its two gates (``normalize_before_policy`` says when).
        lb_f_normalization: how the load-balancing ``f`` is normalised; GShard counts first choices only
            (``"first_choice"``, the default here).
        options: the settings of ``GShardOptions``.
        hidden_size, aux_loss_coef, z_loss_coef, capacity_factor, eval_capacity_factor, min_capacity, init_std,
        jitter, jitter_eps: as for ``TokenChoiceRouter`` (GShard: ``aux_loss_coef = 1e-2``, the default, and
            ``capacity_factor = 1.25`` / ``eval_capacity_factor = 2.0``).
    """

    Options = GShardOptions

    def __init__(
        self,
        *,
        num_experts: int,
        top_k: int = 2,
        renormalize: bool = True,
        lb_f_normalization: str = "first_choice",
        **kwargs,
    ) -> None:
        if top_k != 2:
            raise ValueError(f"router.top_k must be 2 for the gshard router, got {top_k}")
        if num_experts < 2:
            raise ValueError(f"moe.num_experts must be >= 2 for the gshard router, got {num_experts}")
        if not renormalize:
            raise ValueError(
                "router.renormalize must be true for the gshard router: it always normalises its two gates "
                "(router.options.normalize_before_policy chooses before the policy or after dropping)"
            )
        super().__init__(num_experts=num_experts, top_k=2, lb_f_normalization=lb_f_normalization, **kwargs)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                seq_len: int | None = None) -> Routing:
        opts = self.options
        policy = opts.second_policy if self.training else opts.second_policy_eval
        logits_TE = self.router_logits(x_TD)
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

        return token_choice_routing(
            indices_TK,
            gates_TK,
            probs_TE,
            num_experts=self.num_experts,
            capacity_factor=self.active_capacity_factor,
            min_capacity=self.min_capacity,
            # f from the decision before capacity; GShard's "first_choice" counts the i1 alone.
            losses=self.auxiliary_losses(probs_TE, indices_TK, logits_TE),
            has_empty_slots=True,
            renormalize_after_drop=not opts.normalize_before_policy,
            per_rank_stats=True,
            extra_stats={"second_expert_keep_rate": keep2_T.float().mean()},
        )
