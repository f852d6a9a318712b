"""Process groups, the expert-parallel all-to-all dispatcher and the DeepSpeed wiring.

This is the only package that touches ``torch.distributed`` and the only one that imports DeepSpeed; process
groups are always passed in, never looked up from a global.

    groups = build_expert_parallel_groups(world_size, rank, ep_size, num_experts)
    model = apply_expert_parallel(MoEModel(cfg), groups.ep_group)   # after construction, before the optimizer
"""

from parallel.all_to_all import CountMismatchError, all_to_all, exchange_counts, uneven_all_to_all
from parallel.dispatcher import ExpertParallelDispatcher, source_to_expert_order
from parallel.expert_parallel import apply_expert_parallel, expert_group_name, is_expert_param
from parallel.groups import ExpertParallelGroups, build_expert_parallel_groups, expert_parallel_layout

__all__ = [
    "CountMismatchError",
    "ExpertParallelDispatcher",
    "ExpertParallelGroups",
    "all_to_all",
    "apply_expert_parallel",
    "build_expert_parallel_groups",
    "exchange_counts",
    "expert_group_name",
    "expert_parallel_layout",
    "is_expert_param",
    "source_to_expert_order",
    "uneven_all_to_all",
]
