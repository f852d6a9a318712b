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
    """Build the router that ``moe_cfg.router.name`` names, for a layer of width ``hidden_size``.

    Args:
        moe_cfg: a ``moe.config.MoEConfig`` (typed loosely so this package does not import ``moe``).
        hidden_size: D.
    """
    return router_class(moe_cfg.router.name).from_config(moe_cfg, hidden_size)


__all__ = ["ROUTERS", "Router", "Routing", "TopKRouter", "build_router", "router_class", "routing_stats"]
