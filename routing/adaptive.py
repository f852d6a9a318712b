"""Adaptive gating: top-1 for confident tokens, top-2 for uncertain ones (docs/routers.md#adaptive).

Shape legend: T tokens, D model width, E experts, K = 2 slots per token, A assignments.

Li et al. 2023, "Adaptive Gating in Mixture-of-Experts based Language Models" (EMNLP): a token whose two
largest router probabilities differ by at least the threshold ``T_ag`` goes to its first expert only, every
other token to its first two. ``T_ag = 0`` is top-1 everywhere; ``T_ag > 1`` is top-2 everywhere (GShard's
"all" second-expert policy).

NOTE (open question): the paper's weight for a single-expert token is not verified. We follow our design
decision (docs/routers.md#adaptive): by default (``"gshard"``) it is ``p1/(p1+p2)``, GShard's convention
for a skipped second expert, which keeps a task gradient for the router. ``"one"`` renormalizes over the
selected set (weight exactly 1, zero task gradient, as renormalized top-1) and ``"raw"`` uses ``p1``. Two-expert
tokens always use ``p1/(p1+p2), p2/(p1+p2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from moe.routing.base import Routing
from moe.routing.token_choice import TokenChoiceRouter, topk_indices


@dataclass(kw_only=True)
class AdaptiveOptions:
    """``router.options`` of the ``adaptive`` router.

    Attributes:
        threshold: ``T_ag``; a token with ``p1 - p2 >= threshold`` (raw softmax probabilities, not the
            renormalized pair) gets one expert. Task-dependent in the paper; 0.1 is our default.
        single_expert_weight: the weight of a single-expert token: ``"gshard"`` p1/(p1+p2), ``"one"``, ``"raw"`` p1.
    """

    threshold: float = 0.1
    single_expert_weight: Literal["gshard", "one", "raw"] = "gshard"

    def __post_init__(self) -> None:
        if not self.threshold >= 0:  # also rejects NaN
            raise ValueError(f"router.options.threshold must be >= 0, got {self.threshold}")
        if self.single_expert_weight not in ("gshard", "one", "raw"):
            raise ValueError("router.options.single_expert_weight must be one of 'gshard', 'one', 'raw', "
                             f"got {self.single_expert_weight!r}")


class AdaptiveRouter(TokenChoiceRouter):
    """Linear router ``z = W x``; softmax in fp32; one or two experts per token by the gap ``p1 - p2``.

    The common ``router.top_k`` and ``router.renormalize`` do not apply (a token gets 1 or 2 experts, with the
    weights above); ``self.top_k = 2`` is the most a token can get. The load-balancing ``f`` follows
    ``router.lb_f_normalization`` over the variable set (docs/routers.md#adaptive: ``first_choice`` suits it too).
    With a capacity factor, C is sized by the group's mean experts per token (see ``moe.routing.token_choice.mean_k_capacity_factor``).

    Args:
        num_experts: E (>= 2).
        jitter: as for ``TokenChoiceRouter``, but ``"gumbel"`` is refused: the gap rule reads the probabilities,
            and no source defines a noisy gap.
        options: the router's own settings.
        hidden_size, aux_loss_coef, lb_f_normalization, z_loss_coef, capacity_factor, eval_capacity_factor,
        min_capacity, init_std, jitter_eps: as for ``TokenChoiceRouter``.
    """

    Options = AdaptiveOptions
    unused_config_fields = ("top_k", "renormalize")  # they do not apply (above)

    def __init__(self, *, num_experts: int, jitter: str = "none", **kwargs) -> None:
        if num_experts < 2:
            raise ValueError(f"moe.num_experts must be >= 2 for the adaptive router, got {num_experts}")
        if jitter == "gumbel":
            raise ValueError("router.jitter: 'gumbel' is not defined for the adaptive router; use none, "
                             "input_jitter or logit_mult_jitter")
        super().__init__(num_experts=num_experts, top_k=2, jitter=jitter, **kwargs)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                seq_len: int | None = None) -> Routing:
        opts = self.options
        # NOTE: fp32 router maths (float64 for float64 inputs): a bf16 gap p1 - p2 is coarse enough to flip the
        # decision of many tokens.
        logits_TE = self.router_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top2_TK = topk_indices(logits_TE, 2)  # ties towards the lower index
        with torch.no_grad():
            p_TK = probs_TE.gather(1, top2_TK)
            # The threshold reads the raw softmax probabilities, not the renormalized pair (Li et al. 2023).
            single_T = (p_TK[:, 0] - p_TK[:, 1]) >= opts.threshold
        pair_w_TK = torch.softmax(logits_TE.gather(1, top2_TK), dim=-1)  # p_i / (p1 + p2), stably
        if opts.single_expert_weight == "gshard":
            single_w_T = pair_w_TK[:, 0]
        elif opts.single_expert_weight == "raw":
            single_w_T = probs_TE.gather(1, top2_TK[:, :1]).squeeze(1)
        else:  # "one": renormalized over {i1}, a constant, so the router gets no task gradient from it
            single_w_T = torch.ones_like(pair_w_TK[:, 0])
        first_T = torch.where(single_T, single_w_T, pair_w_TK[:, 0])
        second_T = torch.where(single_T, torch.zeros_like(pair_w_TK[:, 1]), pair_w_TK[:, 1])
        weights_TK = torch.stack([first_T, second_T], dim=1)
        indices_TK = torch.where(single_T.unsqueeze(1) & (torch.arange(2, device=x_TD.device) == 1),
                                 torch.full_like(top2_TK, -1), top2_TK)

        return self.variable_k_routing(
            indices_TK,
            weights_TK,
            probs_TE,
            losses=self.auxiliary_losses(probs_TE, indices_TK, logits_TE),
            extra_stats={"single_expert_fraction": single_T.float().mean()},
        )
