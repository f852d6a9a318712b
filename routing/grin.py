"""GRIN: the SparseMixer-v2 gradient estimator for top-k routing (docs/routers.md#grin).

Shape legend: T tokens, D model width, E experts, K = top_k sampling steps per token, A assignments.

GRIN MoE (Liu et al. 2024, "GRIN: GRadient-INformed MoE", appendix A, Algorithms 1–3) trains the router
through the expert *choice* rather than only through the gate value. Each of the K steps is a top-1 step on the
logits that the earlier steps left (Algorithm 3):

1. mask: keep expert i iff ``z* - z_i <= 2ε·max(|z_i|, z*)`` (the reference code's multiplicative form: no
   0/0), with ``z*`` the largest remaining logit. ε is ``router.jitter_eps`` — SparseMixer's *masking
   tolerance*, not a noise scale. π = softmax over the kept experts.
2. training: sample ``D ~ π`` (Gumbel-max on the masked logits); eval: ``D = argmax``.
3. training: ``s = 1`` if D is the argmax or ``B ~ Bernoulli(1/4)`` fires, else ``1/3`` (Heun's third-order
   rule for the sampled choice, Euler for the argmax); eval: ``s = 1``.
4. the weight's forward value is ``s·π_D``; its backward is the closed form
   ``∂L/∂z_j = g·π_D·(1[j = D] - π_j)`` with ``g = ∂L/∂w`` (no factor s; zero for masked experts).

The K weights are summed by the layer, never renormalized. Expert gradient (paper and code disagree): the paper's
``y = h + stopgrad(s·h - h)`` gives the experts the gradient of ``π_D·FFN_D``, which the router asks of the
layer through ``Routing.expert_grad_scale = 1/s``; ``expert_grad_follows_reference_code=True`` gives the
reference code's ``s·π_D·JᵀG`` instead.

Not implemented: SparseMixer-v2* (the paper's temperature-2 variant) and SparseMixer v1 (Liu et al. 2023).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from moe.routing.base import Routing
from moe.routing.jitter import gumbel_noise
from moe.routing.token_choice import TokenChoiceRouter, token_choice_routing, topk_indices

HEUN_SCALE = 1.0 / 3.0  # s on the non-argmax, B = 0 branch (the reference code writes 0.3333)
FIRST_ORDER_PROB = 0.25  # P(B = 1): Heun's rule weights f'(pE) by 1/4 and f'(pE/3) by 3/4


@dataclass(kw_only=True)
class GrinOptions:
    """``router.options`` of the ``grin`` router. GRIN's own settings come from the common fields:
    ``top_k: 2``, ``jitter_eps: 0.01`` (ε, the masking tolerance), ``jitter: none``, dropless
    (``moe.capacity_factor: null``), and ``aux_loss_coef: 0.001`` (the HF ``PhimoeConfig`` default, and
    this router's own when ``router.aux_loss_coef`` is null).

    Attributes:
        expert_grad_follows_reference_code: False (default) gives the experts the gradient of ``π_D·FFN_D``
            (the paper, Algorithm 1); True gives ``s·π_D·JᵀG``, as the authors' code does.
        lb_f_from: ``"routed"`` (default) counts the experts actually routed (sampled in training) in the
            load-balancing ``f``; ``"deterministic_topk"`` counts the top-k of the full softmax (HF PhiMoE port).
    """

    expert_grad_follows_reference_code: bool = False
    lb_f_from: Literal["routed", "deterministic_topk"] = "routed"

    def __post_init__(self) -> None:
        if not isinstance(self.expert_grad_follows_reference_code, bool):
            raise ValueError("router.options.expert_grad_follows_reference_code must be true or false, got "
                             f"{self.expert_grad_follows_reference_code!r}")
        if self.lb_f_from not in ("routed", "deterministic_topk"):
            raise ValueError("router.options.lb_f_from must be 'routed' or 'deterministic_topk', "
                             f"got {self.lb_f_from!r}")


@torch.no_grad()
def first_argmax(scores_TE: torch.Tensor) -> torch.Tensor:
    """(T,) index of each row's maximum, ties broken towards the lower index (``argmax`` promises no order)."""
    E = scores_TE.shape[-1]
    is_max_TE = scores_TE == scores_TE.max(dim=-1, keepdim=True).values
    index_TE = torch.arange(E, device=scores_TE.device).expand_as(scores_TE)
    return torch.where(is_max_TE, index_TE, E).min(dim=-1).values


@torch.no_grad()
def sparsemixer_mask(logits_TE: torch.Tensor, available_TE: torch.Tensor, eps: float) -> torch.Tensor:
    """(T, E) bool: the available experts within the tolerance band of the largest available logit (GRIN, Appendix A).

    ``keep_i ⇔ z* - z_i <= 2ε·max(|z_i|, z*)``: the experts that multiplicative jitter of relative size ε
    could make the argmax. The comparison is multiplicative so that ``z* = z_i = 0`` is kept, not ``0/0``.
    Unavailable experts (chosen by an earlier step) are never kept: step 2's band is measured from the
    maximum of the *remaining* logits.
    """
    zmax_T1 = logits_TE.masked_fill(~available_TE, float("-inf")).max(dim=-1, keepdim=True).values
    within_TE = (zmax_T1 - logits_TE) <= 2 * eps * torch.maximum(logits_TE.abs(), zmax_T1)
    return available_TE & within_TE


class SparseMixerV2Weight(torch.autograd.Function):
    """Forward ``w_k = s_k·π_k[D_k]``; backward ``∂L/∂z = Σ_k (∂L/∂w_k)·π_k[D_k]·(onehot(D_k) - π_k)``.

    The backward is the gradient of ``π_k[D_k]`` alone, whatever s was: Algorithm 1's
    ``h + stopgrad(s·h - h)`` seen from the gate. π_k is zero outside step k's mask, so masked experts get
    exactly zero gradient from step k.
    """

    @staticmethod
    def forward(ctx, logits_TE, experts_TK, pi_TKE, scale_TK):  # type: ignore[override]
        ctx.save_for_backward(experts_TK, pi_TKE)
        return scale_TK * pi_TKE.gather(2, experts_TK.unsqueeze(2)).squeeze(2)

    @staticmethod
    def backward(ctx, grad_w_TK):  # type: ignore[override]
        experts_TK, pi_TKE = ctx.saved_tensors
        c_TK1 = (grad_w_TK * pi_TKE.gather(2, experts_TK.unsqueeze(2)).squeeze(2)).unsqueeze(2)
        grad_TKE = -c_TK1 * pi_TKE
        grad_TKE.scatter_add_(2, experts_TK.unsqueeze(2), c_TK1)
        return grad_TKE.sum(dim=1), None, None, None


def sparsemixer_v2(logits_TE: torch.Tensor, top_k: int, eps: float,
                   training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k by repeated masked top-1 steps (Algorithm 3), training (sampled) or inference (argmax).

    Args:
        logits_TE: (T, E) router logits, fp32 or float64 (Gumbel sampling in bf16 is biased).
        top_k: K steps; a step never picks an expert an earlier step picked.
        eps: ε, the masking tolerance.
        training: sample D and s; otherwise D = argmax and s = 1.
    Returns:
        experts_TK (int64), weights_TK (forward ``s·π_D``, closed-form backward), scale_TK (s, detached).
    """
    T, E = logits_TE.shape
    z_TE = logits_TE.detach()
    available_TE = torch.ones_like(z_TE, dtype=torch.bool)
    experts, pis, scales = [], [], []
    with torch.no_grad():
        for _ in range(top_k):
            keep_TE = sparsemixer_mask(z_TE, available_TE, eps)
            masked_TE = z_TE.masked_fill(~keep_TE, float("-inf"))
            pi_TE = torch.softmax(masked_TE, dim=-1)
            argmax_T = first_argmax(masked_TE)
            if training:
                # Gumbel-max: argmax(z + Gumbel) ~ softmax(z). The noise is added before masking, so a masked
                # expert stays at -inf (never -inf + inf = NaN).
                noisy_TE = (z_TE + gumbel_noise(z_TE)).masked_fill(~keep_TE, float("-inf"))
                chosen_T = first_argmax(noisy_TE)
                first_order_T = (chosen_T == argmax_T) | (torch.rand(T, device=z_TE.device) > 1 - FIRST_ORDER_PROB)
                scale_T = torch.full_like(z_TE[:, 0], HEUN_SCALE).masked_fill(first_order_T, 1.0)
            else:
                chosen_T = argmax_T
                scale_T = torch.ones(T, dtype=z_TE.dtype, device=z_TE.device)
            available_TE = available_TE.scatter(1, chosen_T.unsqueeze(1), False)
            experts.append(chosen_T)
            pis.append(pi_TE)
            scales.append(scale_T)
    experts_TK = torch.stack(experts, dim=1)
    pi_TKE = torch.stack(pis, dim=1)
    scale_TK = torch.stack(scales, dim=1)
    weights_TK = SparseMixerV2Weight.apply(logits_TE, experts_TK, pi_TKE, scale_TK)
    return experts_TK, weights_TK, scale_TK


class GrinRouter(TokenChoiceRouter):
    """Linear router ``z = W x`` with SparseMixer-v2 sampling in training and masked-softmax top-k at inference.

    Dropless only (GRIN trained with no capacity factor), and no router noise: SparseMixer samples its own.
    The common ``router.renormalize`` does not apply: the K weights are never renormalized (it changes the model).

    Args:
        hidden_size: D.
        num_experts: E.
        top_k: K (GRIN: 2).
        options: the router's own settings.
        eps: ε, the masking tolerance (``router.jitter_eps``; GRIN and Phi-3.5-MoE: 0.01).
        aux_loss_coef: α of the load-balancing loss (GRIN: 0.001); ``P`` is the full, unmasked softmax.
        lb_f_normalization: how its ``f`` is normalised (docs/routers.md#load-balancing).
        z_loss_coef: β of the z-loss (GRIN used none; 0 by default).
        init_std: std of the normal init of ``W``.
    """

    Options = GrinOptions
    # Dropless, its own noise, never renormalized (above); router.jitter_eps becomes ``eps``.
    unused_config_fields = ("renormalize", "capacity_factor", "eval_capacity_factor", "min_capacity", "jitter")

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        options: GrinOptions | None = None,
        eps: float = 0.01,
        aux_loss_coef: float = 0.001,
        lb_f_normalization: str = "assignments",
        z_loss_coef: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"router.top_k must be between 1 and num_experts={num_experts}, got {top_k}")
        if not 0 <= eps < 1:
            raise ValueError(f"router.jitter_eps (SparseMixer's masking tolerance ε) must be in [0, 1), got {eps}")
        super().__init__(hidden_size=hidden_size, num_experts=num_experts, top_k=top_k, options=options,
                         aux_loss_coef=aux_loss_coef, lb_f_normalization=lb_f_normalization, z_loss_coef=z_loss_coef,
                         min_capacity=0, init_std=init_std)
        self.eps = eps

    @classmethod
    def kwargs_from_config(cls, moe_cfg, hidden_size: int) -> dict[str, Any]:
        rc = moe_cfg.router
        if rc.jitter != "none":
            raise ValueError(f"router.jitter must be 'none' for the grin router, got {rc.jitter!r}: SparseMixer "
                             "samples its own noise and reads router.jitter_eps as its masking tolerance")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(moe_cfg, name) is not None:
                raise ValueError(f"moe.{name} must be null for the grin router (GRIN trains and serves dropless), "
                                 f"got {getattr(moe_cfg, name)}")
        kwargs = super().kwargs_from_config(moe_cfg, hidden_size)
        kwargs["eps"] = kwargs.pop("jitter_eps")
        return kwargs

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                seq_len: int | None = None) -> Routing:
        K = self.top_k
        # NOTE: fp32 router maths (float64 for float64 inputs): the mask band and the Gumbel samples are biased
        # in bf16 (docs/routers.md#precision-and-ties).
        logits_TE = self.router_logits(x_TD)
        experts_TK, weights_TK, scale_TK = sparsemixer_v2(logits_TE, K, self.eps, self.training)
        probs_TE = torch.softmax(logits_TE, dim=-1)  # full and unmasked: P of the LB loss, the entropy stat
        lb_TK = experts_TK if self.options.lb_f_from == "routed" else topk_indices(logits_TE, K)
        losses = self.auxiliary_losses(probs_TE, lb_TK, logits_TE)

        with torch.no_grad():
            # Share of the K·T draws on the Heun branch (s = 1/3): non-argmax and B = 0; 0 in eval.
            stats = {"heun_fraction": (scale_TK != 1).float().mean()}
        routing = token_choice_routing(
            experts_TK, weights_TK, probs_TE, num_experts=self.num_experts, capacity_factor=None, min_capacity=0,
            losses=losses, extra_stats=stats,
        )
        if self.training and not self.options.expert_grad_follows_reference_code:
            # Dropless, no empty slots: the assignments are token-major, step-minor, like scale_TK.
            routing = dataclasses.replace(routing, expert_grad_scale=(1.0 / scale_TK).reshape(-1))
        return routing
