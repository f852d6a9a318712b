"""Our expert-parallel groups, handed to DeepSpeed.

Shape legend: W world size, P ranks per expert-parallel group.

DeepSpeed looks its expert groups up by name (``ep_size_{P}``, the ``group_name`` tag of expert parameters) in
the tables of ``deepspeed.utils.groups``, and would otherwise build them itself. ``moe.parallel.groups`` builds
them here (the same layout: consecutive ranks per expert-parallel group, "E + D") and this module registers
them in those tables, so the groups the dispatcher exchanges tokens over and the ones DeepSpeed reduces expert
gradients over are the same objects.

NOTE: DeepSpeed offers no public call to register groups that were made elsewhere; the four tables are
module attributes of ``deepspeed.utils.groups`` (DeepSpeed 0.14 to 0.19). Their absence is a clear error.
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.utils import groups as ds_groups

from moe.parallel.expert_parallel import expert_group_name
from moe.parallel.groups import build_expert_parallel_groups

_TABLES = ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
           "_EXPERT_DATA_PARALLEL_GROUP_RANKS")


def expert_groups_for_deepspeed(world_size: int, rank: int, ep_size: int) -> dist.ProcessGroup:
    """This rank's expert-parallel group of ``ep_size`` ranks, registered with DeepSpeed (with its
    expert-data-parallel group) under ``ep_size_{P}``. Collective the first time: every rank calls it; a later
    engine of the same process group reuses what is registered."""
    missing = [t for t in _TABLES if not isinstance(getattr(ds_groups, t, None), dict)]
    if missing:
        raise RuntimeError(f"this DeepSpeed ({getattr(ds_groups, '__file__', '?')}) lacks its expert group tables "
                           f"{', '.join(missing)}; supported: DeepSpeed 0.14 to 0.19")
    name = expert_group_name(ep_size)
    if name in ds_groups._EXPERT_PARALLEL_GROUP:
        return ds_groups._EXPERT_PARALLEL_GROUP[name]
    groups = build_expert_parallel_groups(world_size, rank, ep_size)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(groups.ep_ranks)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(groups.edp_ranks)
    return groups.ep_group
