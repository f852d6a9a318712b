"""The uneven, differentiable all-to-all that moves token rows between the ranks of an expert-parallel group.

Shape legend: P ranks in the group, X count columns per peer (e.g. experts per rank), N rows sent, R rows
received, D row width.

Two steps, in this order on every rank: the counts first (``exchange_counts``: one all-gather of every rank's
send counts, so every rank can check them and derive what it will receive), then the rows
(``all_to_all``: ``all_to_all_single`` with uneven splits; zero rows to or from a peer is allowed). The
backward of ``all_to_all`` is the same exchange in reverse, with the splits swapped.

NOTE: every rank of the group must make the same calls in the same order, including the backward; a rank
that sends and receives nothing still takes part (with empty tensors), or its peers would wait for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class CountMismatchError(ValueError):
    """The counts the ranks of a group declared do not fit together (raised on every rank of the group)."""


def exchange_counts(
    send_counts_PX: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    num_rows: int | None = None,
    expected_recv_counts_PX: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exchange how many rows each rank sends to each peer, and check that the declarations agree.

    Every rank contributes its row counts (and optionally how many rows it holds and what it expects to
    receive); one all-gather gives every rank the whole table, so every rank sees every inconsistency and
    all of them raise the same ``CountMismatchError`` instead of some waiting forever in the row exchange.

    Args:
        send_counts_PX: (P, X) int64, row j = the counts this rank sends to group rank j, split into X
            columns (e.g. per local expert of rank j; X = 1 for plain splits). Non-negative.
        group: the process group (P ranks).
        num_rows: rows this rank will send; checked to equal ``send_counts_PX.sum()`` on every rank.
        expected_recv_counts_PX: (P, X) what this rank expects from each peer, checked against what the peers
            say they send; None to accept whatever they send.
    Returns:
        recv_counts_PX: (P, X) int64 on the same device, row i = the counts group rank i sends to this rank.
    Raises:
        CountMismatchError: on every rank of the group, naming the (global) ranks whose counts disagree.
        ValueError: a malformed ``send_counts_PX`` (shape or dtype); detected before any communication, so it
            is the caller's duty to pass the same shapes on every rank.
    """
    P = dist.get_world_size(group)
    if send_counts_PX.dim() != 2 or send_counts_PX.shape[0] != P:
        raise ValueError(f"send_counts_PX must be (P={P}, X), got {tuple(send_counts_PX.shape)}")
    X = send_counts_PX.shape[1]
    if expected_recv_counts_PX is not None and expected_recv_counts_PX.shape != send_counts_PX.shape:
        raise ValueError(f"expected_recv_counts_PX must be {tuple(send_counts_PX.shape)}, "
                         f"got {tuple(expected_recv_counts_PX.shape)}")
    device = send_counts_PX.device
    # One row per rank: [num_rows, send (P·X), expected (P·X)], -1 meaning "not declared". The layout is
    # the same on every rank whatever it passed, so the all-gather always matches up.
    mine = torch.full((1 + 2 * P * X,), -1, dtype=torch.int64, device=device)
    if num_rows is not None:
        mine[0] = num_rows
    mine[1:1 + P * X] = send_counts_PX.reshape(-1).to(torch.int64)
    if expected_recv_counts_PX is not None:
        mine[1 + P * X:] = expected_recv_counts_PX.reshape(-1).to(torch.int64)
    # NOTE: the list form of all-gather: the same call on torch 2.11 and 2.13, gloo and NCCL (the tensor form
    # is renamed in 2.13 and wants a flat output on gloo); the table is a few integers per expert.
    parts = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts)  # (P, 1 + 2·P·X)

    rows_P = table[:, 0]
    send_PPX = table[:, 1:1 + P * X].reshape(P, P, X)  # [source, destination, column]
    expect_PPX = table[:, 1 + P * X:].reshape(P, P, X)  # [receiver, source, column]
    _check_counts(group, rows_P, send_PPX, expect_PPX)
    me = dist.get_rank(group)
    return send_PPX[:, me].clone()


def _check_counts(group: dist.ProcessGroup, rows_P: torch.Tensor, send_PPX: torch.Tensor,
                  expect_PPX: torch.Tensor) -> None:
    """Raise the same ``CountMismatchError`` on every rank when the gathered table does not fit together."""
    P = rows_P.numel()
    rows, send, expect = rows_P.tolist(), send_PPX.tolist(), expect_PPX.tolist()
    ranks = dist.get_process_group_ranks(group)
    problems = []
    for i in range(P):
        if any(c < 0 for row in send[i] for c in row):
            problems.append(f"rank {ranks[i]} declared negative send counts {send[i]}")
        elif rows[i] >= 0 and rows[i] != sum(map(sum, send[i])):
            problems.append(f"rank {ranks[i]} holds {rows[i]} rows but its send counts sum to "
                            f"{sum(map(sum, send[i]))}")
    for receiver in range(P):
        for source in range(P):
            want = expect[receiver][source]
            if want[0] != -1 and want != send[source][receiver]:
                problems.append(f"rank {ranks[receiver]} expects {want} rows from rank {ranks[source]}, "
                                f"which sends {send[source][receiver]}")
    if problems:
        raise CountMismatchError("all-to-all counts disagree across the group (ranks "
                                 f"{ranks}): " + "; ".join(problems))


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _exchange(x_ND, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):
        # The rows came from the peers in ``recv_splits``; their gradients go back the same way.
        grad_ND = _exchange(grad_RD, ctx.recv_splits, ctx.send_splits, ctx.group)
        return grad_ND, None, None, None


def _exchange(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int],
              group: dist.ProcessGroup) -> torch.Tensor:
    x_ND = x_ND.contiguous()
    out_RD = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
    dist.all_to_all_single(out_RD, x_ND, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                           group=group)
    return out_RD


def all_to_all(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Send rows ``[off_j, off_j + send_splits[j])`` of ``x_ND`` to group rank j; differentiable.

    The splits must already agree across the group (``exchange_counts`` or ``uneven_all_to_all``); this
    function does not check them, since a wrong split here is a hang or a gloo error, not a clean message.

    Args:
        x_ND: (N, ...) rows grouped by destination, N = sum(send_splits).
        send_splits: P row counts, one per destination.
        recv_splits: P row counts, one per source.
        group: the process group.
    Returns:
        (R, ...) with R = sum(recv_splits), the rows from group rank 0 first.
    """
    if x_ND.shape[0] != sum(send_splits):
        raise ValueError(f"x has {x_ND.shape[0]} rows but send_splits sum to {sum(send_splits)}")
    return _AllToAll.apply(x_ND, list(send_splits), list(recv_splits), group)


def uneven_all_to_all(x_ND: torch.Tensor, send_splits: list[int] | torch.Tensor, group: dist.ProcessGroup,
                      recv_splits: list[int] | torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
    """Counts first, then rows: ``exchange_counts`` and then ``all_to_all``.

    Args:
        x_ND: (N, ...) rows grouped by destination.
        send_splits: P row counts, one per destination, summing to N.
        group: the process group.
        recv_splits: what this rank expects from each source, checked against what they send; None to take
            it from the exchange.
    Returns:
        (the received rows (R, ...), recv_splits as a list).
    Raises:
        CountMismatchError: on every rank, when a rank's rows, send counts or expected counts disagree.
    """
    send_P1 = torch.as_tensor(send_splits, dtype=torch.int64).reshape(-1, 1).to(x_ND.device)
    expect_P1 = None if recv_splits is None else torch.as_tensor(recv_splits, dtype=torch.int64).reshape(-1, 1)
    recv_P1 = exchange_counts(send_P1, group, num_rows=x_ND.shape[0],
                              expected_recv_counts_PX=None if expect_P1 is None else expect_P1.to(x_ND.device))
    recv = recv_P1.reshape(-1).tolist()
    return all_to_all(x_ND, send_P1.reshape(-1).tolist(), recv, group), recv
