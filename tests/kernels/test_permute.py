"""The permutations of ``moe.kernels.permute`` against worked examples and plain Python loops."""

import pytest
import torch

from moe.kernels.permute import inverse_permutation, sort_by_expert, source_to_expert_order


def test_sort_by_expert_is_stable():
    expert_A = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    order = sort_by_expert(expert_A)
    # per expert, the assignments in their original order (a loop: the reference)
    want = [a for e in range(3) for a in range(len(expert_A)) if expert_A[a] == e]
    assert order.tolist() == want == [1, 3, 6, 2, 5, 0, 4]
    assert sort_by_expert(torch.zeros(0, dtype=torch.int64)).tolist() == []


@pytest.mark.parametrize("n", [0, 1, 7, 100])
def test_inverse_permutation_undoes_the_gather(n):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    x = torch.arange(n) * 10
    assert torch.equal(x[order][inverse_permutation(order)], x)
    assert all(int(order[int(j)]) == i for i, j in enumerate(inverse_permutation(order)))


def test_source_to_expert_order_worked_example():
    # P = 2 sources, X = 2 local experts. Received (source-major): s0e0 s0e0 | s0e1 | s1e0 | s1e1 s1e1
    #                                           rows:              0    1      2      3      4    5
    recv_PX = torch.tensor([[2, 1], [1, 2]])
    # expert-major: e0 from s0 (0, 1), e0 from s1 (3), e1 from s0 (2), e1 from s1 (4, 5)
    assert source_to_expert_order(recv_PX).tolist() == [0, 1, 3, 2, 4, 5]
    assert source_to_expert_order(torch.zeros(3, 2, dtype=torch.int64)).tolist() == []


def test_source_to_expert_order_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    recv_PX = torch.randint(0, 4, (3, 5), generator=g)
    rows = [(p, x) for p in range(3) for x in range(5) for _ in range(int(recv_PX[p, x]))]  # source-major
    want = sorted(range(len(rows)), key=lambda j: (rows[j][1], rows[j][0], j))  # expert-major, stable
    assert source_to_expert_order(recv_PX).tolist() == want
