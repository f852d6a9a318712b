"""The tiled expert block (``moe.kernels.tiled_experts``) against the composed reference: output and every
gradient, on ragged routings, with tiles split inside experts, with worker threads, and after fork()."""

import multiprocessing

import pytest
import torch

from moe.kernels import ops
from moe.kernels import tiled_experts


@pytest.fixture(autouse=True)
def workers_on_small_tiles(monkeypatch):
    """The tests' tiles are far below ``MIN_TILE_MACS``; let the worker threads split them anyway."""
    monkeypatch.setattr(tiled_experts, "MIN_TILE_MACS", 0)


def _routing(T, E, k, dtype, seed=0, empty=()):
    """Top-k routing of T tokens with random weights; experts in ``empty`` get no rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    for e in empty:
        logits[:, e] = -1e9
    weight_TK, expert_TK = logits.softmax(-1).topk(k)
    expert_A, token_A = expert_TK.reshape(-1), torch.arange(T).repeat_interleave(k)
    order = torch.argsort(expert_A, stable=True)
    counts = torch.bincount(expert_A, minlength=E)
    return token_A[order], weight_TK.reshape(-1)[order].to(dtype), counts


def _inputs(T, D, E, F, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)
    w_gu = (torch.randn(E, D, 2 * F, generator=g, dtype=torch.float64) / D**0.5).to(dtype)
    w_dn = (torch.randn(E, F, D, generator=g, dtype=torch.float64) / F**0.5).to(dtype)
    return x, w_gu, w_dn


def _run(backend, x, w_gu, w_dn, rows, weight, counts, grad_scale=None, g_out=None, **tiled_kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w_gu, w_dn, weight)]
    if backend == "tiled":
        out = tiled_experts.experts_combine(leaves[0], rows, leaves[3], counts, leaves[1], leaves[2], grad_scale,
                                            **tiled_kw)
    else:
        out = ops.experts_combine(leaves[0], rows, leaves[3], counts, leaves[1], leaves[2],
                                  grad_scale_A=grad_scale, backend=backend)
    g_out = torch.randn_like(out) if g_out is None else g_out
    out.backward(g_out)
    return out.detach(), [t.grad for t in leaves], g_out


CASES = [  # (T, D, E, k, F, tile_rows, workers, experts without rows)
    (13, 8, 5, 2, 6, 3, 1, ()),
    (13, 8, 4, 2, 6, 3, 2, ()),
    (40, 12, 7, 3, 4, 5, 2, (2, 5)),
    (9, 4, 3, 1, 8, 2048, 1, (1,)),
    (64, 16, 4, 2, 8, 7, 2, ()),
]


@pytest.mark.parametrize("T,D,E,k,F,tile_rows,workers,empty", CASES)
@pytest.mark.parametrize("scaled", [False, True])
def test_tiled_equals_reference_output_and_every_gradient_float64(T, D, E, k, F, tile_rows, workers, empty, scaled):
    x, w_gu, w_dn = _inputs(T, D, E, F, torch.float64)
    rows, weight, counts = _routing(T, E, k, torch.float64, empty=empty)
    scale = (torch.rand(rows.shape[0], dtype=torch.float64) + 0.5) if scaled else None
    out_r, grads_r, g = _run("reference", x, w_gu, w_dn, rows, weight, counts, scale)
    out_t, grads_t, _ = _run("tiled", x, w_gu, w_dn, rows, weight, counts, scale, g, tile_rows=tile_rows,
                             workers=workers)
    torch.testing.assert_close(out_t, out_r, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("x", "w_gate_up", "w_down", "weight"), grads_t, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12, msg=lambda m, n=name: f"grad {n}: {m}")
    for e in empty:  # an expert without rows gets an exact zero gradient, not uninitialised memory
        assert torch.equal(grads_t[1][e], torch.zeros_like(grads_t[1][e]))
        assert torch.equal(grads_t[2][e], torch.zeros_like(grads_t[2][e]))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_tiled_in_low_precision_matches_float64(dtype, tol):
    x, w_gu, w_dn = _inputs(48, 32, 6, 16, torch.float64)
    rows, weight, counts = _routing(48, 6, 2, torch.float64)
    out_r, grads_r, g = _run("reference", x, w_gu, w_dn, rows, weight, counts)
    low = [t.to(dtype) for t in (x, w_gu, w_dn, weight)]
    out_t, grads_t, _ = _run("tiled", *low[:3], rows, low[3], counts, None, g.to(dtype), tile_rows=10, workers=2)
    assert out_t.dtype == dtype
    torch.testing.assert_close(out_t.double(), out_r, rtol=tol, atol=tol)
    for a, b in zip(grads_t, grads_r):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * float(b.abs().max()))


def test_no_assignments_give_zero_output_and_zero_gradients():
    x, w_gu, w_dn = _inputs(5, 8, 3, 4, torch.float32)
    rows, weight, counts = torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(3, dtype=torch.long)
    out, (g_x, g_gu, g_dn, g_w), _ = _run("tiled", x, w_gu, w_dn, rows, weight, counts)
    assert torch.equal(out, torch.zeros(5, 8)) and torch.equal(g_x, torch.zeros(5, 8))
    assert torch.equal(g_gu, torch.zeros_like(w_gu)) and torch.equal(g_dn, torch.zeros_like(w_dn))
    assert g_w.shape == (0,)


def test_workers_are_deterministic_and_agree_with_one_thread():
    x, w_gu, w_dn = _inputs(300, 32, 8, 16, torch.float32)
    rows, weight, counts = _routing(300, 8, 2, torch.float32)
    g = torch.randn(300, 32)
    runs = [_run("tiled", x, w_gu, w_dn, rows, weight, counts, None, g, tile_rows=16, workers=2) for _ in range(3)]
    for out, grads, _ in runs[1:]:
        assert torch.equal(out, runs[0][0]) and all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))
    one, grads_one, _ = _run("tiled", x, w_gu, w_dn, rows, weight, counts, None, g, tile_rows=16, workers=1)
    torch.testing.assert_close(runs[0][0], one)
    for a, b in zip(runs[0][1], grads_one):
        torch.testing.assert_close(a, b)


def test_no_grad_forward_keeps_nothing_and_matches():
    x, w_gu, w_dn = _inputs(20, 8, 4, 6, torch.float32)
    rows, weight, counts = _routing(20, 4, 2, torch.float32)
    with torch.no_grad():
        out = tiled_experts.experts_combine(x, rows, weight, counts, w_gu, w_dn)
    want = ops.experts_combine(x, rows, weight, counts, w_gu, w_dn, backend="reference")
    torch.testing.assert_close(out, want)
    assert not out.requires_grad


def test_split_gives_contiguous_whole_experts_or_one_group():
    tiles = tiled_experts._tiles([5, 0, 7, 3, 9, 1], 4)
    assert [t[0] for t in tiles] == [0, 0, 2, 2, 3, 4, 4, 4, 5]
    assert all(b - a <= 4 for _, a, b in tiles) and tiles[0][1] == 0 and tiles[-1][2] == 25
    groups = tiled_experts._split(tiles, 2)
    # The float64 cases above with workers=2 do split (their routings are balanced enough).
    for T, _, E, k, _, tile_rows, workers, empty in CASES:
        counts = _routing(T, E, k, torch.float64, empty=empty)[2].tolist()
        assert len(tiled_experts._split(tiled_experts._tiles(counts, tile_rows), workers)) == workers
    assert [t for g in groups for t in g] == tiles and len(groups) == 2
    assert not {t[0] for t in groups[0]} & {t[0] for t in groups[1]}, "an expert was split between workers"
    # One expert holding almost every row: no split (the other worker would idle while this one ran 1 thread).
    assert len(tiled_experts._split(tiled_experts._tiles([100, 1], 8), 2)) == 1
    assert tiled_experts._split([], 2) == [[]]


def test_small_tiles_stay_on_one_thread(monkeypatch):
    monkeypatch.setattr(tiled_experts, "MIN_TILE_MACS", 80_000_000)
    tiles = tiled_experts._tiles([512] * 8, 2048)
    assert len(tiled_experts._split(tiles, 2, macs_per_row=128 * 3 * 256)) == 1  # D=128, F=256: 50 M per tile
    assert len(tiled_experts._split(tiles, 2, macs_per_row=512 * 3 * 128)) == 2  # D=512, F=128: 100 M


def test_mismatched_counts_are_a_clear_error():
    x, w_gu, w_dn = _inputs(4, 8, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="counts_E sums to 3 but there are 4 assignments"):
        tiled_experts.experts_combine(x, torch.arange(4), torch.ones(4), torch.tensor([1, 2]), w_gu, w_dn)


def _child(queue):
    x, w_gu, w_dn = _inputs(64, 16, 4, 8, torch.float32)
    rows, weight, counts = _routing(64, 4, 2, torch.float32)
    queue.put(tiled_experts.experts_combine(x, rows, weight, counts, w_gu, w_dn, tile_rows=8, workers=2).sum().item())


def test_worker_pool_survives_fork():
    """A process forked after the pool started (a DataLoader worker, a launcher) builds its own pool
    instead of waiting forever on threads it did not inherit."""
    _child(multiprocessing.Queue())  # start the parent's pool
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "the forked child hung on the inherited worker pool"
    assert child.exitcode == 0 and isinstance(queue.get(timeout=5), float)


def test_double_backward_is_refused_not_wrong():
    x, w_gu, w_dn = _inputs(16, 8, 2, 4, torch.float64)
    rows, weight, counts = _routing(16, 2, 1, torch.float64)
    x.requires_grad_(True)
    out = tiled_experts.experts_combine(x, rows, weight, counts, w_gu, w_dn)
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable twice|once_differentiable"):
        g.sum().backward()
