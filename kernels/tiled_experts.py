"""The whole routed-expert block as one autograd function over row tiles: gather, gate/up GEMM, SwiGLU,
down GEMM and the weighted scatter-add, tile by tile. The CPU fast path.

Shape legend: T tokens, D model width, F expert hidden width, E experts, A assignments (grouped by expert),
n rows of one tile.

Why tiles: on a CPU the composed path (gather all A rows, two grouped GEMMs, scale, scatter) spends much of
its time writing and re-reading (A, D) tensors that exist only between two ops; with top-8 they are 8× the
size of the layer's input, and every fresh one of them page-faults its memory in. Here each tile of at most
``TILE_ROWS`` rows of one expert is gathered, multiplied, activated, multiplied and added into the output
at once. The only (A, ·) tensor kept for the backward is the gate/up projection ``h_A2F``.

With several intra-op threads the experts are split between as many worker threads, each running its
ops single-threaded, so one worker's gathers and elementwise work overlap the other's GEMMs; each worker
accumulates into its own output buffer and the buffers are summed in a fixed order (deterministic).

The combine weight is folded into the activation before the down GEMM, ``(w·a) @ W_down = w·(a @ W_down)``,
and its gradient is taken as ``<g_out @ W_downᵀ, a>``, which equals ``<g_out, a @ W_down>`` without
recomputing the (A, D) expert output. Accumulation into the output and the input gradient is in fp32.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

# Rows per tile. Measured on the 2-core development CPU (docs/benchmarks.md): whole experts of up to 2,048
# rows beat 512-row tiles by 5-10% (fewer, larger GEMMs and fewer op launches); cache residency mattered less.
TILE_ROWS = 2048
# Worker threads split the experts only when the busiest would get at most this share of the rows; a more
# lopsided split (one hot expert, E=1) runs on one thread with multi-threaded ops instead.
MAX_WORKER_SHARE = 0.6
# ... and only when a tile averages at least this many multiply-adds (rows · D · 3F): below it, the per-op
# Python overhead, serialised by the GIL, outweighs the overlap. Measured on the 2-core development CPU:
# D=128, F=256, 512-row tiles (50 M) ran 1.3× slower with 2 workers; D=512, F=128, 512 rows (100 M) and
# D=512, F=512, 256 rows (200 M) ran 3-8% faster.
MIN_TILE_MACS = 80_000_000

# Worker pools by size, with the process they belong to: a child made by fork() inherits the dict but not
# the threads, so it builds its own.
_pools: dict[int, tuple[int, ThreadPoolExecutor]] = {}


def is_available(device: torch.device, dtype: torch.dtype, k: int, n: int) -> tuple[bool, str]:
    """Whether the tiled block can run here. It runs anywhere, but on a GPU its per-tile launches and the
    host-side group sizes are slower than a grouped GEMM, so ``auto`` picks it only on a CPU."""
    if not dtype.is_floating_point:
        return False, f"the tiled expert block needs a floating-point dtype, not {dtype}"
    return True, ""


Tile = tuple[int, int, int]  # (expert, first row, end row) in the grouped order


def _tiles(counts: list[int], tile_rows: int) -> list[Tile]:
    """``(expert, start, end)`` row ranges in grouped order: each expert's rows in the fewest tiles of at
    most ``tile_rows`` rows, of equal sizes (no small remainder tile)."""
    tiles, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pieces = -(-n // tile_rows)
        bounds = [start + n * i // pieces for i in range(pieces + 1)]
        tiles.extend((e, a, b) for a, b in zip(bounds, bounds[1:]))
        start += n
    return tiles


def _split(tiles: list[Tile], workers: int, macs_per_row: int = MIN_TILE_MACS) -> list[list[Tile]]:
    """Contiguous groups of whole experts with about equal rows, one per worker (each cut at the expert
    boundary nearest its share) — or one group when a split would leave a worker with more than
    ``MAX_WORKER_SHARE`` of the rows or the tiles are too small (``MIN_TILE_MACS``; ``macs_per_row`` is
    D · 3F). Static, so the floating-point summation order, and with it every
    result, is the same on every run."""
    total = tiles[-1][2] - tiles[0][1] if tiles else 0
    if workers < 2 or total == 0 or total * macs_per_row < MIN_TILE_MACS * len(tiles):
        return [tiles]
    # Indices of the tiles that begin an expert: the places a group may start.
    starts = [i for i in range(1, len(tiles)) if tiles[i][0] != tiles[i - 1][0]]
    cuts = [0]
    for j in range(1, workers):
        later = [i for i in starts if i > cuts[-1]]
        if not later:
            break
        cuts.append(min(later, key=lambda i: abs(tiles[i][1] - total * j / workers)))
    groups = [tiles[a:b] for a, b in zip(cuts, cuts[1:] + [len(tiles)])]
    largest = max(g[-1][2] - g[0][1] for g in groups)
    return groups if len(groups) > 1 and largest <= MAX_WORKER_SHARE * total else [tiles]


def _run(groups: list[list[Tile]], work: Callable[[int, list[Tile]], None]) -> None:
    """``work(i, groups[i])`` for every group: inline for one, else one group per pool thread. Each pool
    thread runs its ops single-threaded; the caller's thread count is untouched."""
    if len(groups) == 1:
        work(0, groups[0])
        return
    pid, pool = _pools.get(len(groups), (None, None))
    if pool is None or pid != os.getpid():
        pool = ThreadPoolExecutor(len(groups), thread_name_prefix="moe-tiled", initializer=torch.set_num_threads,
                                  initargs=(1,))
        _pools[len(groups)] = (os.getpid(), pool)
    def job(i: int) -> None:
        with torch.no_grad():  # grad mode is per thread; the autograd function's own passes record nothing
            work(i, groups[i])

    for future in [pool.submit(job, i) for i in range(len(groups))]:
        future.result()


class _TiledExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_gate_up_ED2F, w_down_EFD, weight_A, rows_A, counts, grad_scale_A, tile_rows, workers):  # type: ignore[override]
        T, D = x_TD.shape
        F2 = w_gate_up_ED2F.shape[2]
        acc = torch.promote_types(x_TD.dtype, torch.float32)
        keep = any(ctx.needs_input_grad[:4])
        h_A2F = x_TD.new_empty(rows_A.shape[0], F2) if keep else None
        weight_A1 = weight_A.to(x_TD.dtype).unsqueeze(1)
        groups = _split(_tiles(counts, tile_rows), workers, D * 3 * (F2 // 2))
        outs: list[torch.Tensor] = [None] * len(groups)  # type: ignore[list-item]

        def work(i: int, group: list[Tile]) -> None:
            # Each worker zeroes its own output buffer: the zeroing runs in parallel too.
            out_TD = outs[i] = torch.zeros(T, D, dtype=acc, device=x_TD.device)
            for e, s, t in group:
                r = rows_A[s:t]
                h = torch.mm(x_TD.index_select(0, r), w_gate_up_ED2F[e], out=h_A2F[s:t] if keep else None)
                gate, up = h.chunk(2, dim=1)
                a = F.silu(gate).mul_(up).mul_(weight_A1[s:t])
                out_TD.index_add_(0, r, torch.mm(a, w_down_EFD[e]).to(acc))

        _run(groups, work)
        ctx.groups = groups
        ctx.save_for_backward(x_TD, w_gate_up_ED2F, w_down_EFD, weight_A, rows_A, h_A2F, grad_scale_A)
        return _sum(outs).to(x_TD.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out_TD):  # type: ignore[override]
        x_TD, w_gate_up_ED2F, w_down_EFD, weight_A, rows_A, h_A2F, grad_scale_A = ctx.saved_tensors
        need_x, need_gu, need_dn, need_w = ctx.needs_input_grad[:4]
        groups = ctx.groups
        dtype = x_TD.dtype
        acc = torch.promote_types(dtype, torch.float32)
        g_out_TD = g_out_TD.to(dtype)
        F_ = w_down_EFD.shape[1]
        g_xs: list[torch.Tensor] = [None] * len(groups)  # type: ignore[list-item]
        # Expert-weight gradients: the first tile of an expert writes its slice, later tiles add to it, and
        # experts without rows are zeroed (no full zero-fill of E weight matrices first).
        g_gu = torch.empty_like(w_gate_up_ED2F) if need_gu else None
        g_dn = torch.empty_like(w_down_EFD) if need_dn else None
        g_weight_A = torch.empty(weight_A.shape, dtype=weight_A.dtype, device=weight_A.device) if need_w else None
        # The coefficient of each row's output gradient: its combine weight, times the expert-gradient scale
        # (GRIN) where there is one — the scale reaches the experts and the input, not the combine weight.
        coef_A1 = weight_A.to(dtype).unsqueeze(1)
        if grad_scale_A is not None:
            coef_A1 = coef_A1 * grad_scale_A.to(dtype).unsqueeze(1)

        def work(i: int, group: list[Tile]) -> None:
            if need_x:
                g_x_TD = g_xs[i] = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device)
            previous = None
            for e, s, t in group:
                first, previous = e != previous, e
                r = rows_A[s:t]
                c = coef_A1[s:t]
                g_y = g_out_TD.index_select(0, r)  # (n, D): the gradient of the tile's unweighted expert output
                gate, up = h_A2F[s:t].chunk(2, dim=1)
                silu = F.silu(gate)
                a = silu * up
                g_a = torch.mm(g_y, w_down_EFD[e].t())  # (n, F)
                if need_w:
                    g_weight_A[s:t] = (g_a * a).sum(1).to(weight_A.dtype)
                if need_dn:  # (c·a)ᵀ g_y, scaling whichever operand is narrower
                    lhs, rhs = (a.mul_(c), g_y) if F_ <= g_y.shape[1] else (a, g_y * c)
                    _mm_into(g_dn[e], lhs.t(), rhs, first)
                g_a.mul_(c)
                # SwiGLU backward into one (n, 2F) buffer: d up = g·silu(gate), d gate = silu'(gate)·g·up.
                g_h = torch.empty_like(h_A2F[s:t])
                torch.mul(g_a, silu, out=g_h[:, F_:])
                torch.ops.aten.silu_backward.grad_input(g_a.mul_(up), gate, grad_input=g_h[:, :F_])
                if need_gu:
                    _mm_into(g_gu[e], x_TD.index_select(0, r).t(), g_h, first)
                if need_x:
                    g_x_TD.index_add_(0, r, torch.mm(g_h, w_gate_up_ED2F[e].t()).to(acc))

        _run(groups, work)
        used = {e for group in groups for e, _, _ in group}
        for e in set(range(len(w_down_EFD))) - used:
            if need_gu:
                g_gu[e].zero_()
            if need_dn:
                g_dn[e].zero_()
        g_x = _sum(g_xs).to(dtype) if need_x else None
        return g_x, g_gu, g_dn, g_weight_A, None, None, None, None, None


def _sum(buffers: list[torch.Tensor]) -> torch.Tensor:
    total = buffers[0]
    for b in buffers[1:]:
        total.add_(b)
    return total


def _mm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``dst = a @ b`` on an expert's first tile, ``dst += a @ b`` on the later ones."""
    if first:
        torch.mm(a, b, out=dst)
    else:
        dst.addmm_(a, b)


def experts_combine(x_TD: torch.Tensor, rows_A: torch.Tensor, weight_A: torch.Tensor, counts_E: torch.Tensor,
                    w_gate_up_ED2F: torch.Tensor, w_down_EFD: torch.Tensor, grad_scale_A: torch.Tensor | None = None,
                    tile_rows: int = TILE_ROWS, workers: int | None = None) -> torch.Tensor:
    """``moe.kernels.ops.experts_combine`` (same arguments and result) by row tiles.

    Args:
        tile_rows: the most rows of one expert in one tile.
        workers: threads that split the experts between them (default: ``torch.get_num_threads()``); 1 runs
            every tile on the calling thread.
    """
    counts = counts_E.tolist()
    if sum(counts) != rows_A.shape[0]:
        raise ValueError(f"counts_E sums to {sum(counts)} but there are {rows_A.shape[0]} assignments")
    workers = torch.get_num_threads() if workers is None else workers
    return _TiledExperts.apply(x_TD, w_gate_up_ED2F, w_down_EFD, weight_A, rows_A, counts, grad_scale_A,
                               tile_rows, workers)
