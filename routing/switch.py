"""Switch Transformer top-1 routing (Fedus et al., "Switch Transformers", 2021, §2.1–§2.2).

Shape legend: T tokens, D model width, E experts, A assignments.

    p = softmax(W x) in fp32,   i = argmax p,   y = p_i · FFN_i(x)

The gate ``p_i`` is **not** renormalised: it is the router's only task-gradient path (renormalised, it is
exactly 1 and the router would learn from the auxiliary loss alone; docs/routers.md#topk). Capacity ``C = ceil(cf·T/E)``
(the common formula with k = 1) keeps tokens in token order; a dropped token's MoE output is 0 and it
passes through the residual only. The load-balancing loss ``α·E·Σ_e f_e·P_e`` takes ``f`` from the
decision before dropping and its gradient flows through ``P`` only.

This is the top-k softmax router with k = 1 and no renormalisation, so it reuses ``TopKRouter`` whole; the
class pins those two settings and rejects a recipe that asks for anything else.
"""

from __future__ import annotations

from typing import Any

from moe.routing.topk import TopKRouter


class SwitchRouter(TopKRouter):
    """Top-1 softmax router of the Switch Transformer.

    Args: as ``TopKRouter`` without ``top_k`` and ``renormalize``. Paper settings: ``aux_loss_coef = 1e-2``
    (the default), optional z-loss ``1e-3``, ``capacity_factor = 1.25`` / ``eval_capacity_factor = 2.0`` or
    dropless, and ``jitter = "input_jitter"`` with ε = 1e-2 (the experts keep the clean input).
    """

    unused_config_fields = ("top_k", "renormalize")  # pinned: 1 and False

    def __init__(self, **kwargs) -> None:
        for name in ("top_k", "renormalize"):
            if name in kwargs:
                raise TypeError(f"SwitchRouter takes no {name!r}: it is top-1 without renormalisation")
        super().__init__(top_k=1, renormalize=False, **kwargs)

    @classmethod
    def kwargs_from_config(cls, moe_cfg, hidden_size: int) -> dict[str, Any]:
        rc = moe_cfg.router
        wrong = ([f"router.top_k must be 1 for the switch router, got {rc.top_k}"] if rc.top_k != 1 else []) + (
            ["router.renormalize must be false for the switch router: a renormalised top-1 weight is exactly 1 "
             "and gives the router no task gradient"] if rc.renormalize else [])
        if wrong:
            raise ValueError("; ".join(wrong))
        return super().kwargs_from_config(moe_cfg, hidden_size)
