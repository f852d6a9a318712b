"""The router registry: config name -> router class (every router implements ``moe.routing.base.Router``)."""

from __future__ import annotations

from moe.routing.base import Router
from moe.routing.adaptive import AdaptiveRouter
from moe.routing.grin import GrinRouter
from moe.routing.top_p import TopPRouter
from moe.routing.expert_choice import ExpertChoiceRouter
from moe.routing.gshard import GShardRouter
from moe.routing.hash import HashRouter
from moe.routing.sigmoid import SigmoidRouter
from moe.routing.switch import SwitchRouter
from moe.routing.topk import TopKRouter

# Config name -> router class. Each class is built by ``build_router`` from the MoE config.
ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "adaptive": AdaptiveRouter,
    "top_p": TopPRouter,
    "grin": GrinRouter,
    "sigmoid": SigmoidRouter,
    "switch": SwitchRouter,
    "gshard": GShardRouter,
    "expert_choice": ExpertChoiceRouter,
    "hash": HashRouter,
}


def router_class(name: str) -> type[Router]:
    """The router class registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return ROUTERS[name]
    except KeyError:
        # Registry order, so the default ("topk") comes first.
        raise ValueError(f"unknown router {name!r}; valid routers: {', '.join(ROUTERS)}") from None


def build_router(moe_cfg, hidden_size: int) -> Router:
    """Build the router that ``moe_cfg.router.name`` names, for a layer of width ``hidden_size``.

    Args:
        moe_cfg: a ``moe.config.MoEConfig`` (typed loosely: routing sits below the model config).
        hidden_size: D.
    """
    return router_class(moe_cfg.router.name).from_config(moe_cfg, hidden_size)


