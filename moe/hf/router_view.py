"""What a model's router computes at inference (``eval()``), in the terms export needs.

Shape legend: E experts, K experts per token, D model width.

    softmax_topk(moe)      (K, renormalize) when the router is, at inference, softmax -> top-K -> optional
                           renormalisation, per token and dropless: ``topk``, ``switch`` (K = 1, not renormalised),
                           ``gshard`` with ``second_policy_eval: all`` (K = 2, renormalised; both
                           ``normalize_before_policy`` settings give p_i / (p_1 + p_2)) or ``none`` without
                           ``normalize_before_policy`` (K = 1, weight 1)
    sigmoid_topk(moe)      the ``sigmoid`` router's settings when it is dropless at inference
    stochastic_reason(moe) why the router's inference is random (no engine reproduces it), else None
    routing_settings(cfg)  every router's inference settings, resolved (defaults and capacity factors filled in),
                           for the remote-code model (``moe/hf/remote_code/routing_moe_train.py``)

Training-only settings (noise, auxiliary losses, the training capacity factor, bias updates) never matter here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from moe.config import ModelConfig, MoEConfig
from moe.routing.registry import build_router


@dataclass(frozen=True)
class SigmoidTopK:
    top_k: int
    renormalize: bool
    route_scale: float
    n_groups: int
    topk_groups: int
    selection_bias: bool  # loss_free_bias: a per-expert bias that only chooses (and scores groups by their top 2)

    @property
    def groups_limit(self) -> bool:
        """Whether the group limit can exclude an expert (keeping every group is no limit)."""
        return self.n_groups > 1 and self.topk_groups < self.n_groups


def softmax_topk(moe: MoEConfig) -> tuple[int, bool] | None:
    r = moe.router
    if moe.eval_capacity_factor is not None:
        return None
    if r.name == "topk":
        return r.top_k, r.renormalize
    if r.name == "switch":
        return 1, False
    if r.name == "gshard":
        opts = r.router_options()
        if opts.second_policy_eval == "all":
            return 2, True
        if opts.second_policy_eval == "none" and not opts.normalize_before_policy:
            return 1, True
    return None


def sigmoid_topk(moe: MoEConfig) -> SigmoidTopK | None:
    r = moe.router
    if r.name != "sigmoid" or moe.eval_capacity_factor is not None:
        return None
    o = r.router_options()
    return SigmoidTopK(top_k=r.top_k, renormalize=r.renormalize, route_scale=o.route_scale, n_groups=o.n_groups,
                       topk_groups=o.topk_groups, selection_bias=o.loss_free_bias)


def stochastic_reason(moe: MoEConfig) -> str | None:
    if moe.router.name == "gshard":
        policy = moe.router.router_options().second_policy_eval
        if policy in ("random", "sampling"):
            return (f"router gshard with router.options.second_policy_eval={policy!r} draws the second expert at "
                    "random at inference; use all, none or threshold")
    return None


def routing_settings(cfg: ModelConfig) -> dict[str, Any]:
    """The router's inference settings, read from the router that our model builds (so defaults cannot drift)."""
    m = cfg.moe
    assert m is not None
    with torch.device("meta"):
        router = build_router(m, cfg.hidden_size)
    name = m.router.name
    out: dict[str, Any] = dict(name=name, num_experts=m.num_experts, shared_hidden_size=m.shared_hidden_size,
                               min_capacity=getattr(router, "min_capacity", 0),
                               capacity_factor=getattr(router, "eval_capacity_factor", None))
    opts = m.router.router_options()
    if name in ("topk", "switch"):
        out.update(top_k=router.top_k, renormalize=router.renormalize)
    elif name == "gshard":
        out.update(second_policy=opts.second_policy_eval, second_threshold=opts.second_threshold,
                   normalize_before_policy=opts.normalize_before_policy)
    elif name == "sigmoid":
        out.update(top_k=router.top_k, renormalize=router.renormalize, route_scale=opts.route_scale,
                   n_groups=opts.n_groups, topk_groups=opts.topk_groups, loss_free_bias=opts.loss_free_bias)
    elif name == "adaptive":
        out.update(threshold=opts.threshold, single_expert_weight=opts.single_expert_weight)
    elif name == "top_p":
        out.update(threshold=opts.threshold, boundary=opts.boundary, max_experts=router.top_k)
    elif name == "grin":
        out.update(top_k=router.top_k, eps=router.eps, capacity_factor=None)
    elif name == "expert_choice":
        cf = router.capacity_factor if router.eval_capacity_factor is None else router.eval_capacity_factor
        out.update(eval_routing=router.eval_routing, group=router.group, capacity_factor=cf)
    elif name == "hash":
        out.update(num_hashes=router.num_hashes, hash_function=router.hash_function)
    else:  # a router added to the registry without an inference form here
        raise ValueError(f"cannot export: router {name!r} has no inference form in moe.hf.router_view")
    return out


def options_resolved(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``router.options`` spelled out in full (each router's defaults filled in), so a folder's
    config says what the router did even if a later version changes a default."""
    if cfg.moe is None:
        return cfg
    r = cfg.moe.router
    full = dataclasses.asdict(r.router_options())
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, router=dataclasses.replace(r, options=full)))
