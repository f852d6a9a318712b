"""The part every token-choice router shares: its settings and losses (``TokenChoiceRouter``), pick the
top-k, then turn ``(indices_TK, weights_TK)`` plus capacity into a ``Routing`` (docs/routers.md#capacity).

Shape legend: T tokens, D model width, E experts, K slots per token, A assignments.

A slot holding ``-1`` is empty (e.g. a GShard second choice that its policy did not keep): it takes no
expert slot, is not an assignment and is not counted as dropped.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from moe.routing.base import Routing, loss_overrides, routing_stats
from moe.routing.capacity import capacity_keep_mask, expert_capacity
from moe.routing.linear import LinearRouter
from moe.routing.losses import load_balancing_loss, z_loss


def common_router_kwargs(moe_cfg: Any, hidden_size: int) -> dict[str, Any]:
    """The constructor arguments every token-choice router reads from ``moe.config.MoEConfig`` and its
    ``RouterConfig`` (typed loosely so this package does not import ``moe``)."""
    rc = moe_cfg.router
    return dict(
        hidden_size=hidden_size,
        num_experts=moe_cfg.num_experts,
        top_k=rc.top_k,
        renormalize=rc.renormalize,
        z_loss_coef=rc.z_loss_coef,
        capacity_factor=moe_cfg.capacity_factor,
        eval_capacity_factor=moe_cfg.eval_capacity_factor,
        min_capacity=moe_cfg.min_capacity,
        init_std=rc.init_std,
        jitter=rc.jitter,
        jitter_eps=rc.jitter_eps,
        **loss_overrides(rc),
    )


class TokenChoiceRouter(LinearRouter):
    """Base class of the linear-gate token-choice routers: the settings they all read from ``RouterConfig`` and
    ``MoEConfig``, their load-balancing and z-losses, and ``from_config``. Subclasses add the routing rule
    (``forward``), their own settings and checks, and their own defaults (passed on to this constructor).

    Args:
        top_k: K, the most experts a token can get.
        options: the router's ``Options`` (None: their defaults).
        aux_loss_coef: α of the Switch load-balancing loss (0 disables it).
        lb_f_normalization: how its ``f`` is normalised (docs/routers.md#load-balancing).
        z_loss_coef: β of the router z-loss (0 disables it).
        capacity_factor: None for dropless; else the training capacity factor.
        eval_capacity_factor: capacity factor in ``eval()`` mode (None: dropless).
        min_capacity: lower bound on the slots per expert.
        hidden_size, num_experts, init_std, jitter, jitter_eps: as for ``LinearRouter``.
    """

    # Fields of ``common_router_kwargs`` that do not apply to the router: its constructor does not take them,
    # and ``kwargs_from_config`` leaves them out.
    unused_config_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        options: Any = None,
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
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}")
        super().__init__(hidden_size=hidden_size, num_experts=num_experts, init_std=init_std, jitter=jitter,
                         jitter_eps=jitter_eps)
        self.top_k = top_k
        self.options = self.Options() if options is None else options
        self.aux_loss_coef = aux_loss_coef
        self.lb_f_normalization = lb_f_normalization
        self.z_loss_coef = z_loss_coef
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity

    @classmethod
    def from_config(cls, moe_cfg: Any, hidden_size: int) -> "TokenChoiceRouter":
        return cls(**cls.kwargs_from_config(moe_cfg, hidden_size))

    @classmethod
    def kwargs_from_config(cls, moe_cfg: Any, hidden_size: int) -> dict[str, Any]:
        """The constructor arguments for ``moe_cfg``: ``common_router_kwargs`` but its ``unused_config_fields``,
        and the router's ``options``. A router that checks the config, or renames a field, extends this."""
        kwargs = common_router_kwargs(moe_cfg, hidden_size)
        for name in cls.unused_config_fields:
            del kwargs[name]
        return dict(kwargs, options=moe_cfg.router.router_options())

    @property
    def active_capacity_factor(self) -> float | None:
        """The capacity factor of the current mode (``train()`` or ``eval()``); None is dropless."""
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def variable_k_routing(self, indices_TK: torch.Tensor, weights_TK: torch.Tensor, probs_TE: torch.Tensor, *,
                           losses: dict[str, torch.Tensor],
                           extra_stats: dict[str, torch.Tensor] | None = None) -> Routing:
        """``token_choice_routing`` for the routers whose tokens take a variable number of experts (empty slots
        are -1): capacity sized by the mean experts per token (``mean_k_capacity_factor``)."""
        return token_choice_routing(
            indices_TK,
            weights_TK,
            probs_TE,
            num_experts=self.num_experts,
            capacity_factor=mean_k_capacity_factor(self.active_capacity_factor, indices_TK),
            min_capacity=self.min_capacity,
            losses=losses,
            has_empty_slots=True,
            extra_stats=extra_stats,
        )

    def auxiliary_losses(
        self,
        probs_TE: torch.Tensor,
        indices_TK: torch.Tensor,
        logits_TE: torch.Tensor,
        own: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``load_balancing`` (if α > 0), then the router's ``own`` losses, then ``z_loss`` (if β > 0).

        NOTE: the model sums the losses in this order, and a floating-point sum depends on its order.

        Args:
            probs_TE: (T, E) the router distribution ``P`` of the load-balancing loss.
            indices_TK: (T, K) the experts its ``f`` counts (before capacity), ``-1`` for an empty slot.
            logits_TE: (T, E) the logits of the z-loss.
            own: further losses of the router, already multiplied by their coefficients.
        Returns:
            name -> scalar, each multiplied by its coefficient.
        """
        losses: dict[str, torch.Tensor] = {}
        if self.aux_loss_coef > 0:
            lb = load_balancing_loss(probs_TE, indices_TK, self.num_experts,
                                     self.lb_f_normalization)  # type: ignore[arg-type]
            losses["load_balancing"] = self.aux_loss_coef * lb
        losses.update(own or {})
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * z_loss(logits_TE)
        return losses


@torch.no_grad()
def topk_indices(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """(T, k) indices of the k largest scores per row, ties broken towards the lower expert index
    (docs/routers.md#precision-and-ties).

    A stable descending sort gives the tie-break that ``torch.topk`` does not promise; ``-inf`` scores sort last.
    Fast path: ``torch.topk`` of k+1 scores, whose answer is the sort's whenever
    none of those k+1 values repeats (the usual case for continuous scores); rows are sorted only if one
    does (with E=64 the full sort took 5 ms of a 300 ms layer step on the development CPU).
    """
    E = scores_TE.shape[-1]
    if k < E:
        values, indices = torch.topk(scores_TE, k + 1, dim=-1, sorted=True)
        if not bool((values[:, 1:] == values[:, :-1]).any()) and not bool(values.isnan().any()):
            return indices[:, :k]
    return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices[:, :k]


def mean_k_capacity_factor(capacity_factor: float | None, indices_TK: torch.Tensor) -> float | None:
    """The factor that makes ``token_choice_routing``'s ``C = ceil(cf'·K·T/E)`` equal ``ceil(cf·k̄·T/E)``.

    Variable-k routers size the capacity by the group's mean experts per token ``k̄ = A/T`` instead of their
    slot width K (our choice), i.e. ``C = ceil(cf·A/E)``: the capacity factor keeps its meaning of
    "slots per expert relative to the load actually asked for". (Equal up to float rounding of ``cf·A/E``.)

    Args:
        capacity_factor: cf, or None for dropless.
        indices_TK: (T, K) chosen experts, -1 for an empty slot.
    """
    if capacity_factor is None:
        return None
    T, K = indices_TK.shape
    requested = int((indices_TK >= 0).sum())
    return capacity_factor * requested / max(T * K, 1)


def token_choice_routing(
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    probs_TE: torch.Tensor | None,
    *,
    num_experts: int,
    capacity_factor: float | None,
    min_capacity: int,
    losses: dict[str, torch.Tensor],
    has_empty_slots: bool = False,
    renormalize_after_drop: bool = False,
    per_rank_stats: bool = False,
    extra_stats: dict[str, torch.Tensor] | None = None,
) -> Routing:
    """The assignments of a token-choice decision, after capacity (or dropless when ``capacity_factor`` is None).

    Capacity ``C = max(min_capacity, ceil(cf·K·T/E))``; priority is rank-major, then token order, so second
    choices never displace first choices and no token is dropped because of a later token of its rank.
    Surviving weights are not renormalized (legacy Mesh-TF) unless ``renormalize_after_drop``.

    Args:
        indices_TK: (T, K) chosen experts in rank order, ``-1`` for an empty slot.
        weights_TK: (T, K) combine weights (carry the gradient); ignored in empty slots.
        probs_TE: the router distribution for the entropy statistic (None: not reported).
        num_experts: E.
        capacity_factor: None for dropless.
        min_capacity: lower bound on C.
        losses: the router's losses, already multiplied by their coefficients.
        has_empty_slots: ``indices_TK`` may hold ``-1`` (False skips the checks, and a device sync, for routers
            that always fill every slot).
        renormalize_after_drop: divide each token's surviving weights by their sum (Lingvo non-legacy).
        per_rank_stats: also report ``dropped_fraction_rank{j}`` for j = 1..K.
        extra_stats: further detached statistics of the router.
    Returns:
        the ``Routing``, assignments in token-major, rank-minor order.
    """
    T, K = indices_TK.shape
    E = num_experts
    with torch.no_grad():
        valid_TK = indices_TK >= 0
        if capacity_factor is None:
            keep_TK = valid_TK
        elif has_empty_slots:
            capacity = expert_capacity(capacity_factor, K, T, E, min_capacity)
            # Empty slots go to a spare bucket E, so that they take none of the real experts' slots.
            bucketed_TK = torch.where(valid_TK, indices_TK, E)
            keep_TK = capacity_keep_mask(bucketed_TK, E + 1, capacity) & valid_TK
        else:
            keep_TK = capacity_keep_mask(indices_TK, E, expert_capacity(capacity_factor, K, T, E, min_capacity))
    if renormalize_after_drop:
        kept_w_TK = torch.where(keep_TK, weights_TK, torch.zeros_like(weights_TK))
        denom_T1 = kept_w_TK.sum(-1, keepdim=True)
        weights_TK = kept_w_TK / torch.where(denom_T1 > 0, denom_T1, torch.ones_like(denom_T1))
    token_TK = torch.arange(T, device=indices_TK.device).unsqueeze(1).expand(T, K)
    if capacity_factor is None and not has_empty_slots:
        token_A, expert_A, weight_A = token_TK.reshape(-1), indices_TK.reshape(-1), weights_TK.reshape(-1)
    else:
        token_A, expert_A, weight_A = token_TK[keep_TK], indices_TK[keep_TK], weights_TK[keep_TK]
    with torch.no_grad():
        tokens_per_expert_E = torch.bincount(expert_A, minlength=E)
        requested = int(valid_TK.sum()) if has_empty_slots else T * K
        stats = routing_stats(probs_TE, tokens_per_expert_E, T, dropped=requested - expert_A.numel(),
                              requested=requested)
        if per_rank_stats:
            for j in range(K):
                asked = valid_TK[:, j].sum()
                lost = (valid_TK[:, j] & ~keep_TK[:, j]).sum()
                stats[f"dropped_fraction_rank{j + 1}"] = lost.float() / asked.clamp(min=1).float()
        stats.update(extra_stats or {})
    return Routing(
        token_index=token_A,
        expert_index=expert_A,
        weight=weight_A,
        tokens_per_expert=tokens_per_expert_E,
        losses=losses,
        stats=stats,
    )
