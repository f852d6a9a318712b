"""Dynamic top-p routing: as many experts as it takes to cover probability mass θ (docs/routers.md#top_p).

Shape legend: T tokens, D model width, E experts, K = max_experts slots per token, A assignments.

Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models". Sort each token's
softmax probabilities in descending order and select the shortest prefix whose cumulative sum exceeds θ;
the expert that crosses θ is included, so a token always gets at least one expert. Weights are the raw
selected probabilities, not renormalized (as in the authors' code). An entropy loss ``β·mean_t H(p_t)``
sharpens the router; without it the router drifts towards uniform and activates many experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from moe.routing.base import Routing
from moe.routing.token_choice import TokenChoiceRouter


@dataclass(kw_only=True)
class TopPOptions:
    """``router.options`` of the ``top_p`` router.

    Attributes:
        threshold: θ in [0, 1); 0.4 is the authors' config default. θ = 0 is top-1 without renormalization.
        boundary: ``"strict"`` selects up to the first j with ``c_j > θ`` (the authors' code);
            ``"inclusive"`` with ``c_j >= θ`` (the paper's text). They differ only when ``c_j == θ`` exactly.
        max_experts: k_max, the most experts a token may get (None: E). A flat router otherwise activates all.
        entropy_loss_coef: β of the dynamic (entropy) loss ``β·mean_t H(p_t)`` (paper: 1e-4; 0 disables it).
    """

    threshold: float = 0.4
    boundary: Literal["strict", "inclusive"] = "strict"
    max_experts: int | None = None
    entropy_loss_coef: float = 1e-4

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 1:
            raise ValueError(f"router.options.threshold must be in [0, 1), got {self.threshold}")
        if self.boundary not in ("strict", "inclusive"):
            raise ValueError(f"router.options.boundary must be 'strict' or 'inclusive', got {self.boundary!r}")
        if self.max_experts is not None and self.max_experts < 1:
            raise ValueError(f"router.options.max_experts must be >= 1 or null, got {self.max_experts}")
        if not self.entropy_loss_coef >= 0:
            raise ValueError(f"router.options.entropy_loss_coef must be >= 0, got {self.entropy_loss_coef}")


@torch.no_grad()
def top_p_indices(probs_TE: torch.Tensor, threshold: float, max_experts: int,
                  boundary: str = "strict") -> torch.Tensor:
    """(T, max_experts) experts in descending probability, ``-1`` after the one whose cumulative sum crosses θ.

    Ties break towards the lower expert index (stable sort). The count is ``1 + #{j : c_j <= θ}`` (strict) or
    ``1 + #{j : c_j < θ}`` (inclusive), capped at ``max_experts``: c is non-decreasing, so those j form a
    prefix, and a cumulative sum that rounds to just below 1 with θ close to 1 still selects every expert.

    Args:
        probs_TE: (T, E) router probabilities (fp32 or float64; never bf16, whose cumulative sums are wrong).
        threshold: θ.
        max_experts: K, at most E.
        boundary: ``"strict"`` or ``"inclusive"``.
    """
    sorted_TE, order_TE = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    cum_TE = sorted_TE.cumsum(dim=-1)
    below_TE = cum_TE <= threshold if boundary == "strict" else cum_TE < threshold
    count_T1 = (below_TE.sum(dim=-1, keepdim=True) + 1).clamp(max=max_experts)
    slot_K = torch.arange(max_experts, device=probs_TE.device)
    return torch.where(slot_K < count_T1, order_TE[:, :max_experts], torch.full_like(order_TE[:, :max_experts], -1))


def entropy_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """``mean_t H(softmax(z_t))``, ``H(p) = -Σ_e p_e log p_e``; multiply by β outside.

    ``log_softmax`` keeps ``log p`` finite where ``p`` underflows to 0, so ``0·log 0`` never becomes NaN.
    """
    log_p_TE = torch.log_softmax(logits_TE, dim=-1)
    return -(log_p_TE.exp() * log_p_TE).sum(dim=-1).mean()


class TopPRouter(TokenChoiceRouter):
    """Linear router ``z = W x``; softmax in fp32; the smallest descending prefix with mass above θ.

    The common ``router.top_k`` and ``router.renormalize`` do not apply; ``self.top_k`` is ``max_experts``, the
    most a token can get. The load-balancing ``f`` uses ``router.lb_f_normalization`` over the variable set
    (``"assignments"``, the default, gives Σf = 1; docs/routers.md#load-balancing). With a capacity factor, C is
    sized by the group's mean experts per token (``moe.routing.token_choice.mean_k_capacity_factor``).

    Args:
        num_experts: E.
        options: the router's own settings.
        jitter: as for ``TokenChoiceRouter``, but ``"gumbel"`` is refused: the rule reads the probabilities, and
            no source defines a noisy cumulative mass.
        hidden_size, aux_loss_coef, lb_f_normalization, z_loss_coef, capacity_factor, eval_capacity_factor,
        min_capacity, init_std, jitter_eps: as for ``TokenChoiceRouter``.
    """

    Options = TopPOptions
    unused_config_fields = ("top_k", "renormalize")  # they do not apply (above)

    def __init__(self, *, num_experts: int, options: TopPOptions | None = None, jitter: str = "none",
                 **kwargs) -> None:
        options = options or TopPOptions()
        k_max = options.max_experts
        if k_max is not None and k_max > num_experts:
            raise ValueError(f"router.options.max_experts must be <= moe.num_experts={num_experts}, got {k_max}")
        if jitter == "gumbel":
            raise ValueError("router.jitter: 'gumbel' is not defined for the top_p router; use none, "
                             "input_jitter or logit_mult_jitter")
        super().__init__(num_experts=num_experts, top_k=k_max or num_experts, options=options, jitter=jitter,
                         **kwargs)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                seq_len: int | None = None) -> Routing:
        opts = self.options
        # NOTE: fp32 router maths (float64 for float64 inputs): the cumulative sum must not be bf16.
        logits_TE = self.router_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        indices_TK = top_p_indices(probs_TE, opts.threshold, self.top_k, opts.boundary)
        # Raw probabilities, not renormalized (authors' code); empty slots gather expert 0 and are dropped.
        weights_TK = probs_TE.gather(1, indices_TK.clamp(min=0))
        own = {"entropy": opts.entropy_loss_coef * entropy_loss(logits_TE)} if opts.entropy_loss_coef > 0 else {}

        return self.variable_k_routing(indices_TK, weights_TK, probs_TE,
                                       losses=self.auxiliary_losses(probs_TE, indices_TK, logits_TE, own=own))
