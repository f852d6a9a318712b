"""Routers behind one interface (``routing.base``), selectable by name from a recipe."""

from __future__ import annotations

from routing.base import Router, Routing, routing_stats
from routing.topk import TopKRouter

# Config name -> router class. Each class is built by ``build_router`` from the MoE config.
ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
}


def router_class(name: str) -> type[Router]:
    """The router class registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; valid routers: {', '.join(sorted(ROUTERS))}") from None


def build_router(moe_cfg, hidden_size: int) -> Router:
    """Build the router that ``moe_cfg.router`` names for a layer of width ``hidden_size``.

    Args:
        moe_cfg: a ``moe.config.MoEConfig`` (typed loosely so this package does not import ``moe``).
        hidden_size: D.
    """
    rc = moe_cfg.router
    cls = router_class(rc.name)
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


__all__ = ["ROUTERS", "Router", "Routing", "TopKRouter", "build_router", "router_class", "routing_stats"]
