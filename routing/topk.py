"""Token-choice top-k router with softmax (docs/routers.md#topk).

Shape legend: T tokens, D model width, E experts, K = top_k slots per token, A assignments.

``renormalize=True`` is Mixtral's top-k-then-softmax (the selected probabilities divided by their sum);
``False`` is softmax-then-top-k (Switch, the NVIDIA upcycling study), where every logit gets gradient.
"""

from __future__ import annotations

import torch

from moe.routing.base import Routing
from moe.routing.token_choice import TokenChoiceRouter, token_choice_routing, topk_indices


class TopKRouter(TokenChoiceRouter):
    """Linear router ``z = W x``, softmax in fp32, top-k with ties broken towards the lower expert index.

    Args:
        renormalize: divide the selected probabilities by their sum.
        hidden_size, num_experts, top_k, aux_loss_coef, lb_f_normalization, z_loss_coef, capacity_factor,
        eval_capacity_factor, min_capacity, init_std, jitter, jitter_eps: as for ``TokenChoiceRouter``
            (``top_k`` is required; the others keep its defaults).
    """

    def __init__(self, *, renormalize: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.renormalize = renormalize

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                seq_len: int | None = None) -> Routing:
        logits_TE = self.router_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        # softmax is monotone, so ranking the logits ranks the probabilities (gumbel: the noisy logits).
        indices_TK = topk_indices(self.jitter.selection(logits_TE), self.top_k)
        if self.renormalize:
            # softmax over the selected logits == selected probabilities / their sum (the full normaliser
            # cancels), and for k=1 it is exactly 1 with exactly zero gradient.
            weights_TK = torch.softmax(logits_TE.gather(1, indices_TK), dim=-1)
        else:
            weights_TK = probs_TE.gather(1, indices_TK)

        return token_choice_routing(
            indices_TK,
            weights_TK,
            probs_TE,
            num_experts=self.num_experts,
            capacity_factor=self.active_capacity_factor,
            min_capacity=self.min_capacity,
            losses=self.auxiliary_losses(probs_TE, indices_TK, logits_TE),
        )
