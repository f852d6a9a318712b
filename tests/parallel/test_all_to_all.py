"""The uneven differentiable all-to-all on 4 gloo ranks: exact rows and gradients, empty ranks, clean errors.

One spawned job runs every check (``all_to_all_checks``); each test below asserts on its part of the result.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.parallel.launcher import run_distributed

WORLD = 4
# COUNTS[i][j]: rows rank i sends to rank j. Uneven, with zeros; rank 3 sends nothing and receives nothing.
COUNTS = [[1, 0, 3, 0],
          [2, 2, 0, 0],
          [0, 1, 1, 0],
          [0, 0, 0, 0]]


def _rows(src: int, dst: int, n: int) -> torch.Tensor:
    """The n rows src sends to dst, each naming its source, destination and index (exact in float64)."""
    k = torch.arange(n, dtype=torch.float64)
    return torch.stack([src * 100 + dst * 10 + k, -k], dim=1)


def _exchange_and_backward(rank: int, send: list[int], recv: list[int] | None, use_counts: bool) -> dict:
    from moe.parallel.all_to_all import all_to_all, uneven_all_to_all

    group = dist.group.WORLD
    x = torch.cat([_rows(rank, j, n) for j, n in enumerate(send)]).requires_grad_(True)
    if use_counts:
        y, got_recv = uneven_all_to_all(x, send, group)
    else:
        y, got_recv = all_to_all(x, send, recv, group), recv
    want = torch.cat([_rows(i, rank, COUNTS[i][rank]) for i in range(WORLD)])
    assert torch.equal(y, want), (rank, y, want)
    # The receiver weights row k from source i by (10·rank + i + 1)·(k + 1): the sender must get exactly that
    # back as the gradient of the row it sent.
    w = torch.cat([(10 * rank + i + 1) * (torch.arange(c, dtype=torch.float64) + 1) for i, c in enumerate(got_recv)])
    (y * w[:, None]).sum().backward()
    want_grad = torch.cat([(10 * j + rank + 1) * (torch.arange(n, dtype=torch.float64) + 1) for j, n in enumerate(send)])
    assert torch.equal(x.grad, want_grad[:, None].expand(-1, 2)), (rank, x.grad, want_grad)
    return {"recv": got_recv}


def all_to_all_checks(rank: int, world_size: int) -> dict:
    from moe.parallel.all_to_all import CountMismatchError, exchange_counts, uneven_all_to_all

    assert world_size == WORLD
    out: dict = {}
    send = COUNTS[rank]
    recv = [COUNTS[i][rank] for i in range(WORLD)]
    out["splits_given"] = _exchange_and_backward(rank, send, recv, use_counts=False)
    out["splits_exchanged"] = _exchange_and_backward(rank, send, None, use_counts=True)

    # Nobody sends anything: empty tensors everywhere, forward and backward, no hang.
    x = torch.zeros(0, 3, requires_grad=True)
    y, r = uneven_all_to_all(x, [0] * WORLD, dist.group.WORLD)
    y.sum().backward()
    out["all_empty"] = {"recv": r, "shape": list(y.shape), "grad_shape": list(x.grad.shape)}

    # Per-column counts (the dispatcher's per-expert form): row j of the result is what rank j sends here.
    send_PX = torch.tensor([[rank, 2 * rank] for _ in range(WORLD)])
    out["columns"] = exchange_counts(send_PX, dist.group.WORLD).tolist()

    # A rank expecting other counts than its peer sends: every rank raises the same error, naming both.
    wrong = list(recv)
    if rank == 1:
        wrong[0] += 2
    try:
        uneven_all_to_all(torch.cat([_rows(rank, j, n) for j, n in enumerate(send)]), send, dist.group.WORLD,
                          recv_splits=wrong)
        out["mismatch"] = None
    except CountMismatchError as e:
        out["mismatch"] = str(e)
    # A rank whose rows do not add up to its send counts: the same, everywhere.
    extra = 1 if rank == 2 else 0
    try:
        uneven_all_to_all(torch.zeros(sum(send) + extra, 2), send, dist.group.WORLD)
        out["rows_mismatch"] = None
    except CountMismatchError as e:
        out["rows_mismatch"] = str(e)
    # ... and the group is still usable afterwards: every rank stopped at the same point.
    out["after_errors"] = _exchange_and_backward(rank, send, None, use_counts=True)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed("tests.parallel.test_all_to_all:all_to_all_checks", WORLD,
                           tmp_path_factory.mktemp("a2a"), timeout=60)


def test_uneven_rows_and_gradients_are_exact(results):
    for rank, res in enumerate(results):
        want_recv = [COUNTS[i][rank] for i in range(WORLD)]
        assert res["splits_given"]["recv"] == want_recv
        assert res["splits_exchanged"]["recv"] == want_recv  # derived from the counts exchange
        assert res["after_errors"]["recv"] == want_recv


def test_rank_that_sends_and_receives_nothing_does_not_hang(results):
    assert results[3]["splits_exchanged"]["recv"] == [0, 0, 0, 0]  # rank 3 took part with empty tensors
    for res in results:
        assert res["all_empty"] == {"recv": [0] * WORLD, "shape": [0, 3], "grad_shape": [0, 3]}


def test_counts_exchange_per_column(results):
    for res in results:
        assert res["columns"] == [[i, 2 * i] for i in range(WORLD)]


def test_count_mismatch_is_the_same_clean_error_on_every_rank(results):
    messages = {res["mismatch"] for res in results}
    assert len(messages) == 1 and None not in messages, messages
    assert "rank 1 expects [2] rows from rank 0, which sends [0]" in messages.pop()
    messages = {res["rows_mismatch"] for res in results}
    assert len(messages) == 1 and None not in messages, messages
    assert "rank 2 holds 3 rows but its send counts sum to 2" in messages.pop()


def _hang_after_failure(rank: int, world_size: int) -> None:
    if rank == 0:
        raise RuntimeError("rank 0 fails on purpose")
    dist.barrier()  # waits for rank 0, which never comes


def test_launcher_turns_a_failed_rank_into_a_failure_not_a_hang(tmp_path):
    with pytest.raises(AssertionError, match="(?s)ranks exited with.*rank 0 fails on purpose"):
        run_distributed("tests.parallel.test_all_to_all:_hang_after_failure", 2, tmp_path, timeout=30)
