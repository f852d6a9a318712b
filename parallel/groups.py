"""Process groups for expert parallelism (EP) nested inside data parallelism (DP).

Shape legend: W world size, P = ep_size ranks per expert-parallel group, E experts, E/P experts per rank.

The W ranks are cut into W/P expert-parallel groups of P consecutive ranks; each group holds one full copy
of the experts, split E/P per rank, and exchanges tokens inside itself with all-to-all. The ranks that hold
the same expert shard (the same position in every EP group, so every P-th rank) form an expert-data-parallel
group: the gradients of expert weights are reduced over it, and only over it. Everything else (attention,
embeddings, routers, shared experts) is replicated on all W ranks and reduced over the whole DP group.

    W = 4, P = 2:   EP groups [0, 1], [2, 3]      expert-data-parallel groups [0, 2], [1, 3]

This is the layout of DeepSpeed's own expert groups (its default, "E + D"); DeepSpeed runs use these groups
(``moe.parallel.deepspeed.groups`` registers them with it under ``ep_size_{P}``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


def expert_parallel_layout(world_size: int, ep_size: int,
                           num_experts: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """The ranks of every expert-parallel and every expert-data-parallel group (pure; no communication).

    Args:
        world_size: W.
        ep_size: P, ranks per expert-parallel group.
        num_experts: E, checked to be divisible by P when given.
    Returns:
        (ep_groups, edp_groups): W/P lists of P ranks, and P lists of W/P ranks.
    Raises:
        ValueError: P < 1, W not divisible by P, or E not divisible by P.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    if world_size % ep_size:
        raise ValueError(f"world size {world_size} is not divisible by ep_size {ep_size}: expert-parallel groups "
                         f"of {ep_size} ranks must tile the world; valid ep_size: {_divisors(world_size)}")
    if num_experts is not None and num_experts % ep_size:
        raise ValueError(f"num_experts {num_experts} is not divisible by ep_size {ep_size}: every rank of an "
                         f"expert-parallel group must hold the same number of experts; valid ep_size: "
                         f"{[d for d in _divisors(world_size) if num_experts % d == 0]}")
    ep_groups = [list(range(start, start + ep_size)) for start in range(0, world_size, ep_size)]
    edp_groups = [list(range(i, world_size, ep_size)) for i in range(ep_size)]
    return ep_groups, edp_groups


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's two groups and its place in them.

    Attributes:
        ep_group: the P ranks that split the experts between them and exchange tokens.
        edp_group: the W/P ranks that hold the same experts; expert gradients are reduced over it.
        ep_ranks: global ranks of ``ep_group``, in group-rank order.
        edp_ranks: global ranks of ``edp_group``.
        ep_size: P.
        ep_rank: this rank's position in ``ep_group`` (which slice of the experts it holds).
    """

    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup
    ep_ranks: tuple[int, ...]
    edp_ranks: tuple[int, ...]

    @property
    def ep_size(self) -> int:
        return len(self.ep_ranks)

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep_group)



def build_expert_parallel_groups(world_size: int, rank: int, ep_size: int, num_experts: int | None = None,
                                 backend: str | None = None) -> ExpertParallelGroups:
    """Create the expert-parallel and expert-data-parallel groups; every rank must call it, in the same order
    relative to its other ``new_group`` calls (``torch.distributed.new_group`` is collective).

    Args:
        world_size: W, which must be the initialised default group's size.
        rank: this process's global rank.
        ep_size: P.
        num_experts: E, validated against P when given (E % P == 0).
        backend: for ``new_group`` (None: the default group's).
    Raises:
        ValueError: a bad ``ep_size`` (before any group is created, so every rank fails the same way), or
            ``world_size`` / ``rank`` disagreeing with the initialised default group.
    """
    ep_groups, edp_groups = expert_parallel_layout(world_size, ep_size, num_experts)
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: call init_process_group before building groups")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(f"world_size={world_size}, rank={rank} given, but the default process group has "
                         f"world size {dist.get_world_size()} and this process is rank {dist.get_rank()}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    mine_ep = mine_edp = None
    # NOTE: new_group is collective over the whole world: every rank creates every group, in the same order.
    for ranks in ep_groups:
        group = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            mine_ep = (group, tuple(ranks))
    for ranks in edp_groups:
        group = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            mine_edp = (group, tuple(ranks))
    assert mine_ep is not None and mine_edp is not None
    return ExpertParallelGroups(ep_group=mine_ep[0], edp_group=mine_edp[0], ep_ranks=mine_ep[1],
                                edp_ranks=mine_edp[1])


def launched_world_size() -> int:
    """How many processes this run has: the initialised default group's size, else the launcher's
    ``WORLD_SIZE`` (``deepspeed``, ``torchrun``), else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1
