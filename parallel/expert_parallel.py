"""``apply_expert_parallel(model, ep_group)``: shard every MoE layer's experts over a group, after construction.

Shape legend: E experts, X = E/P experts per rank, P ranks in the expert-parallel group, D model width,
F expert hidden width.

Build the full model on every rank from the same seed (or load the same checkpoint), then apply expert
parallelism, then build the optimizer: each MoE layer keeps only its rank's slice ``[r·X, (r+1)·X)`` of the
3-D expert weights (``w_gate_up_ED2F`` (X, D, 2F), ``w_down_EFD`` (X, F, D), registered as new parameters
under the same names) and routes through ``ExpertParallelDispatcher``. Routers, shared experts and every
other parameter stay replicated.

Expert parameters are tagged the way DeepSpeed's MoE support expects (``deepspeed/moe/experts.py``):
``param.allreduce = False`` (``deepspeed.moe.utils.is_moe_param``) and ``param.group_name =
"ep_size_{P}"`` (the key of DeepSpeed's expert-parallel and expert-data-parallel group tables), so their
gradients are reduced over the expert-data-parallel group only. The tags are plain attributes: this module
does not import DeepSpeed.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from moe.layer import LocalDispatcher, MoELayer
from moe.parallel.dispatcher import ExpertParallelDispatcher

logger = logging.getLogger(__name__)


def expert_group_name(ep_size: int) -> str:
    """The ``group_name`` tag of expert parameters, DeepSpeed's name for its EP groups of ``ep_size`` ranks."""
    return f"ep_size_{ep_size}"


def is_expert_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is an expert-parallel parameter (DeepSpeed's ``is_moe_param`` test)."""
    return getattr(param, "allreduce", True) is False


def _shard(param: nn.Parameter, start: int, stop: int, group_name: str) -> nn.Parameter:
    local = nn.Parameter(param.detach()[start:stop].clone(), requires_grad=param.requires_grad)
    local.allreduce = False  # type: ignore[attr-defined]
    local.group_name = group_name  # type: ignore[attr-defined]
    return local


def apply_expert_parallel(model: nn.Module, ep_group: dist.ProcessGroup) -> nn.Module:
    """Shard the experts of every ``MoELayer`` in ``model`` over ``ep_group`` and install the dispatcher.

    Args:
        model: a model holding all E experts in each MoE layer, identical on every rank of ``ep_group``.
        ep_group: the P ranks that split the experts; every rank of it must call this, with the same model.
    Returns:
        ``model``, modified in place (returned for chaining).
    Raises:
        ValueError: a layer's E not divisible by P, a layer already sharded, or no MoE layer at all.
    """
    P, r = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("apply_expert_parallel: the model has no MoELayer to shard")
    for layer in layers:  # validate every layer before changing any
        if layer.num_experts % P:
            raise ValueError(f"num_experts {layer.num_experts} is not divisible by ep_size {P}: every rank of "
                             "an expert-parallel group must hold the same number of experts")
        if not isinstance(layer.dispatcher, LocalDispatcher) or layer.experts.w_gate_up_ED2F.shape[0] != layer.num_experts:
            raise ValueError("apply_expert_parallel: a MoE layer is already expert-parallel")
    name = expert_group_name(P)
    for layer in layers:
        X = layer.num_experts // P
        experts = layer.experts
        experts.w_gate_up_ED2F = _shard(experts.w_gate_up_ED2F, r * X, (r + 1) * X, name)
        experts.w_down_EFD = _shard(experts.w_down_EFD, r * X, (r + 1) * X, name)
        experts.num_experts = X  # what its tensors hold; the layer and its router keep the global E
        layer.dispatcher = ExpertParallelDispatcher(ep_group, layer.num_experts)
    logger.info("expert parallel: %d MoE layers sharded over %d ranks (this rank: group rank %d)", len(layers), P, r)
    return model
