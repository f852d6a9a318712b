"""Cheapest tier, no processes: the group layout and its start-up errors."""

import pytest

from moe.parallel.groups import build_expert_parallel_groups, expert_parallel_layout


@pytest.mark.parametrize("world_size, ep_size, ep_groups, edp_groups", [
    (1, 1, [[0]], [[0]]),
    (4, 1, [[0], [1], [2], [3]], [[0, 1, 2, 3]]),
    (4, 2, [[0, 1], [2, 3]], [[0, 2], [1, 3]]),
    (4, 4, [[0, 1, 2, 3]], [[0], [1], [2], [3]]),
    (6, 3, [[0, 1, 2], [3, 4, 5]], [[0, 3], [1, 4], [2, 5]]),
])
def test_layout_is_deepspeeds_expert_then_data(world_size, ep_size, ep_groups, edp_groups):
    # DeepSpeed's _create_expert_and_data_parallel: EP groups of consecutive ranks, expert-data-parallel
    # groups of every ep_size-th rank.
    assert expert_parallel_layout(world_size, ep_size, num_experts=ep_size * 2) == (ep_groups, edp_groups)


@pytest.mark.parametrize("world_size, ep_size, num_experts, message", [
    (4, 3, None, "world size 4 is not divisible by ep_size 3.*valid ep_size: \\[1, 2, 4\\]"),
    (4, 4, 6, "num_experts 6 is not divisible by ep_size 4.*valid ep_size: \\[1, 2\\]"),
    (4, 0, 8, "ep_size must be >= 1, got 0"),
    (0, 1, 8, "world_size must be >= 1"),
])
def test_bad_sizes_are_value_errors_before_any_group_is_made(world_size, ep_size, num_experts, message):
    with pytest.raises(ValueError, match=message):
        expert_parallel_layout(world_size, ep_size, num_experts)
    # the builder checks the sizes first, so it fails the same way on every rank, even before init
    with pytest.raises(ValueError, match=message):
        build_expert_parallel_groups(world_size, 0, ep_size, num_experts)


def test_builder_needs_an_initialised_default_group():
    with pytest.raises(ValueError, match="not initialised"):
        build_expert_parallel_groups(2, 0, 2, 4)

