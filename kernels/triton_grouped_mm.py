"""Grouped GEMM with the row gather fused into the kernel, in Triton (ScatterMoE-style).

Shape legend:
    T tokens (rows of the ungathered input), A assignments (rows grouped by expert), E experts,
    K input width of the GEMM, N output width of the GEMM, B row blocks of the block table.

Rows ``[off_e, off_e + counts_E[e])`` of the grouped dimension use expert ``e``; the kernel reads row
``rows_A[a]`` of ``x_TK`` directly, so the ``x_TK[rows_A]`` copy of ``moe.kernels.reference`` is never made
("Scattered Mixture-of-Experts Implementation", Tan et al. 2024, Sec. 3: fusing the scatter/gather
into the grouped GEMM saves a copy of the activations and its memory traffic).

Backward: ``dx`` reuses the forward kernel with ``w`` transposed through its strides, then an fp32
``index_add_`` over ``rows_A`` (a token can be used by several assignments under top-k); ``dw`` has its
own kernel that gathers ``x`` rows by index as well.

Tiles come from ``moe.kernels.triton_tiles`` (by GPU family, operand type and rows per expert). Offsets
that multiply a block index by a stride are 64-bit, so tensors past 2^31 elements are addressed exactly.

On CPU the kernels run only under the Triton interpreter: ``TRITON_INTERPRET=1`` must be in the
environment before this module is imported, because ``triton.jit`` picks the backend when it decorates.
Launches go through a ``Runtime`` (``use_runtime``): ``moe.kernels.triton_aot`` records them there to compile
them for sm_90 and sm_80 on a machine without a GPU.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    _TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as err:
    # NOTE: keep this module importable without Triton, so callers can ask is_available() for the reason
    # instead of failing at import; the stand-in only lets the kernel definitions below be parsed.
    _TRITON_IMPORT_ERROR = err
    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=None)
    InterpretedFunction = None

from moe.kernels import triton_tiles
from moe.kernels.triton_tiles import Tile

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _gather_mm_kernel(
    x_ptr, rows_ptr, w_ptr, y_ptr,
    block_expert_ptr, block_start_ptr, block_end_ptr,
    N, K,
    stride_xt, stride_xk,
    stride_we, stride_wk, stride_wn,
    stride_ya, stride_yn,
    HAS_ROWS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of ``y_AN = x_TK[rows_A] @ w_EKN[e]``; a row block never spans two experts."""
    pid_b = tl.program_id(0)
    # 64-bit block indices: n * stride_wn reaches K * N (the transposed weight of the input gradient)
    pid_n = tl.program_id(1).to(tl.int64)
    e = tl.load(block_expert_ptr + pid_b)  # int64, from the int64 table: e * stride_we stays exact
    start = tl.load(block_start_ptr + pid_b)
    end = tl.load(block_end_ptr + pid_b)  # end of the expert's rows: masks the padding of its last block

    a_M = start + tl.arange(0, BLOCK_M)  # int64, from the int64 table: safe for large A * N offsets
    mask_M = a_M < end
    if HAS_ROWS:
        t_M = tl.load(rows_ptr + a_M, mask=mask_M, other=0)  # the fused gather
    else:
        t_M = a_M
    n_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_N = n_N < N
    k_K = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + t_M[:, None] * stride_xt + k_K[None, :] * stride_xk
    w_ptrs = w_ptr + e * stride_we + k_K[:, None] * stride_wk + n_N[None, :] * stride_wn
    acc_MN = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_K = k0 + k_K < K
        x_MK = tl.load(x_ptrs, mask=mask_M[:, None] & mask_K[None, :], other=0.0)
        w_KN = tl.load(w_ptrs, mask=mask_K[:, None] & mask_N[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 as raw uint16 bits; see _dot_flags
            x_MK = x_MK.to(tl.float32)
            w_KN = w_KN.to(tl.float32)
        acc_MN = tl.dot(x_MK, w_KN, acc_MN, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    y_ptrs = y_ptr + a_M[:, None] * stride_ya + n_N[None, :] * stride_yn
    if UPCAST and y_ptr.dtype.element_ty == tl.bfloat16:
        # The interpreter's fp32 -> bf16 cast truncates; the GPU's rounds to nearest even. Round here alike
        # (bits + 0x7FFF + the lowest kept bit, then keep the top 16; finite values).
        bits = acc_MN.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        y_MN = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y_MN = acc_MN.to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, y_MN, mask=mask_M[:, None] & mask_N[None, :])


@triton.jit
def _gather_mm_dw_kernel(
    x_ptr, rows_ptr, dy_ptr, dw_ptr, offsets_ptr,
    N, K,
    stride_xt, stride_xk,
    stride_dya, stride_dyn,
    stride_dwe, stride_dwk, stride_dwn,
    HAS_ROWS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_K, BLOCK_N) tile of ``dw_EKN[e] = x_TK[rows of e].T @ dy_AN[rows of e]``."""
    # 64-bit block indices: e * stride_dwe passes 2^31 once E * K * N does (it wrapped in int32 before)
    e = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2).to(tl.int64)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)

    k_K = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_K = k_K < K
    n_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_N = n_N < N
    # An expert with no rows skips the loop and stores exact zeros.
    acc_KN = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        a_M = m0 + tl.arange(0, BLOCK_M)
        mask_M = a_M < end
        if HAS_ROWS:
            t_M = tl.load(rows_ptr + a_M, mask=mask_M, other=0)
        else:
            t_M = a_M
        # x is loaded already transposed, (BLOCK_K, BLOCK_M), by swapping the roles of the two offsets.
        xt_ptrs = x_ptr + k_K[:, None] * stride_xk + t_M[None, :] * stride_xt
        xt_KM = tl.load(xt_ptrs, mask=mask_K[:, None] & mask_M[None, :], other=0.0)
        dy_ptrs = dy_ptr + a_M[:, None] * stride_dya + n_N[None, :] * stride_dyn
        dy_MN = tl.load(dy_ptrs, mask=mask_M[:, None] & mask_N[None, :], other=0.0)
        if UPCAST:
            xt_KM = xt_KM.to(tl.float32)
            dy_MN = dy_MN.to(tl.float32)
        acc_KN = tl.dot(xt_KM, dy_MN, acc_KN, input_precision=PRECISION)

    dw_ptrs = dw_ptr + e * stride_dwe + k_K[:, None] * stride_dwk + n_N[None, :] * stride_dwn
    if UPCAST and dw_ptr.dtype.element_ty == tl.bfloat16:  # round to nearest even, as in _gather_mm_kernel
        bits = acc_KN.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        dw_KN = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        dw_KN = acc_KN.to(dw_ptr.dtype.element_ty)
    tl.store(dw_ptrs, dw_KN, mask=mask_K[:, None] & mask_N[None, :])


def is_available(device: torch.device, dtype: torch.dtype = torch.float32, k: int = 0, n: int = 0) -> tuple[bool, str]:
    """Whether these kernels can run a ``(A, k) @ (E, k, n)`` grouped GEMM in ``dtype`` on ``device``, and why
    not when they cannot."""
    device = torch.device(device)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False, f"triton backend supports float32, bfloat16 and float16, not {dtype}"
    if _TRITON_IMPORT_ERROR is not None:
        return False, f"triton cannot be imported: {_TRITON_IMPORT_ERROR}"
    if device.type == "cuda":
        return True, "triton on CUDA"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False, "Triton runs on CPU only in its interpreter: set TRITON_INTERPRET=1 before importing triton"
        if not isinstance(_gather_mm_kernel, InterpretedFunction):
            return False, "TRITON_INTERPRET=1 was set after the kernels were built: set it before importing triton"
        return True, "triton interpreter on CPU"
    return False, f"no Triton backend for device type {device.type!r}"


class _Groups(NamedTuple):
    """Index bookkeeping shared by the forward and both backward launches."""

    offsets_E1: torch.Tensor  # (E + 1,) int64 exclusive cumsum of counts_E, then A
    expert_B: torch.Tensor  # (B,) int64 expert of each row block
    start_B: torch.Tensor  # (B,) int64 first grouped row of each block
    end_B: torch.Tensor  # (B,) int64 end of the block's expert rows (exclusive)


def _make_groups(counts_E: torch.Tensor, rows_A: torch.Tensor | None, T: int, block_m: int) -> _Groups:
    """Build the row-block table: each expert's rows padded up to a multiple of ``block_m``, so that no
    block straddles two experts; experts with no rows get no blocks. One host sync, to size the grid and
    to validate ``counts_E`` and ``rows_A`` (an out-of-range row would be an out-of-bounds read)."""
    A = T if rows_A is None else rows_A.numel()
    blocks_E = (counts_E + block_m - 1) // block_m
    bad_rows = torch.zeros((), dtype=torch.int64, device=counts_E.device)
    if rows_A is not None:
        bad_rows = ((rows_A < 0) | (rows_A >= T)).sum()
    stats = torch.stack([counts_E.sum(), (counts_E < 0).sum(), bad_rows, blocks_E.sum()])
    total, negative, bad, num_blocks = stats.tolist()  # the one host sync
    if negative:
        raise ValueError(f"counts_E must be non-negative, got {counts_E.tolist()}")
    if total != A:
        what = "len(rows_A)" if rows_A is not None else "x_TK.shape[0] (rows_A is None)"
        raise ValueError(f"counts_E must sum to {what} = {A}, got sum {total}")
    if bad:
        raise ValueError(f"rows_A must index rows of x_TK in [0, {T}); {bad} entries do not")

    offsets_E1 = torch.nn.functional.pad(counts_E.cumsum(0), (1, 0))
    E = counts_E.numel()
    expert_B = torch.repeat_interleave(torch.arange(E, device=counts_E.device), blocks_E, output_size=num_blocks)
    first_block_E = blocks_E.cumsum(0) - blocks_E
    in_expert_B = torch.arange(num_blocks, device=counts_E.device) - first_block_E[expert_B]
    start_B = offsets_E1[expert_B] + in_expert_B * block_m
    end_B = offsets_E1[expert_B + 1]
    return _Groups(offsets_E1, expert_B, start_B, end_B)


class Runtime:
    """Where the wrappers' launches go: a CUDA device, or the interpreter on a CPU. ``triton_aot`` swaps in
    one that records the launches instead, to compile them for a GPU that is not there (``use_runtime``)."""

    def arch(self, device: torch.device) -> int | None:
        """Compute capability as an int (90 for sm_90) of a CUDA device; None under the interpreter."""
        if device.type != "cuda":
            return None
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor

    def check(self, device: torch.device) -> None:
        ok, reason = is_available(device)
        if not ok:
            raise RuntimeError(f"triton gather_grouped_mm unavailable on {device}: {reason}")

    def launch(self, kernel, grid: tuple[int, ...], args: dict, tile: Tile) -> None:
        kernel[grid](**args, num_warps=tile.num_warps, num_stages=tile.num_stages)


_runtime = Runtime()


@contextmanager
def use_runtime(runtime: Runtime) -> Iterator[Runtime]:
    """Send this module's launches to ``runtime`` inside the ``with`` block."""
    global _runtime
    saved, _runtime = _runtime, runtime
    try:
        yield runtime
    finally:
        _runtime = saved


def _dot_flags(dtype: torch.dtype, arch: int | None) -> dict:
    # NOTE: the Triton interpreter (arch None) stores bf16 as uint16 and its tl.dot multiplies those raw bits
    # as integers (garbage results), so under the interpreter bf16 tiles are upcast to fp32 first (exact, as
    # the GPU's bf16 MMA products are) and stores round to nearest explicitly (see the kernels).
    # fp32 follows torch's matmul precision setting: exact ("ieee") by default, TF32 when allowed.
    return {"UPCAST": arch is None and dtype == torch.bfloat16, "PRECISION": _precision(dtype)}


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # Triton's default; only consulted for fp32 operands


def _launch_gather_mm(
    x_TK: torch.Tensor, rows_A: torch.Tensor | None, w_EKN: torch.Tensor, groups: _Groups, out_dtype: torch.dtype,
    tile: Tile, arch: int | None,
) -> torch.Tensor:
    """``y_AN = x_TK[rows_A] @ w_EKN[e]`` per group; ``w_EKN`` may be any strided view (e.g. transposed)."""
    A = x_TK.shape[0] if rows_A is None else rows_A.numel()
    K, N = w_EKN.shape[1], w_EKN.shape[2]
    # Every row lies in some expert's block (counts sum to A), so the kernel writes all of y.
    y_AN = torch.empty(A, N, dtype=out_dtype, device=x_TK.device)
    num_blocks = groups.expert_B.numel()
    if num_blocks == 0 or N == 0:
        return y_AN.zero_()
    grid = (num_blocks, triton.cdiv(N, tile.block_n))
    args = dict(
        x_ptr=x_TK,
        rows_ptr=x_TK if rows_A is None else rows_A,  # unused when HAS_ROWS is False
        w_ptr=w_EKN,
        y_ptr=y_AN,
        block_expert_ptr=groups.expert_B,
        block_start_ptr=groups.start_B,
        block_end_ptr=groups.end_B,
        N=N,
        K=K,
        stride_xt=x_TK.stride(0),
        stride_xk=x_TK.stride(1),
        stride_we=w_EKN.stride(0),
        stride_wk=w_EKN.stride(1),
        stride_wn=w_EKN.stride(2),
        stride_ya=y_AN.stride(0),
        stride_yn=y_AN.stride(1),
        HAS_ROWS=rows_A is not None,
        **_dot_flags(x_TK.dtype, arch),
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
    )
    _runtime.launch(_gather_mm_kernel, grid, args, tile)
    return y_AN


def _launch_gather_mm_dw(
    x_TK: torch.Tensor, rows_A: torch.Tensor | None, dy_AN: torch.Tensor, groups: _Groups, E: int,
    tile: Tile, arch: int | None,
) -> torch.Tensor:
    """``dw_EKN[e] = x_TK[rows of e].T @ dy_AN[rows of e]``; zero for experts with no rows."""
    K, N = x_TK.shape[1], dy_AN.shape[1]
    dw_EKN = torch.empty(E, K, N, dtype=x_TK.dtype, device=x_TK.device)
    if E == 0 or K == 0 or N == 0:
        return dw_EKN.zero_()
    grid = (E, triton.cdiv(K, tile.block_k), triton.cdiv(N, tile.block_n))
    args = dict(
        x_ptr=x_TK,
        rows_ptr=x_TK if rows_A is None else rows_A,  # unused when HAS_ROWS is False
        dy_ptr=dy_AN,
        dw_ptr=dw_EKN,
        offsets_ptr=groups.offsets_E1,
        N=N,
        K=K,
        stride_xt=x_TK.stride(0),
        stride_xk=x_TK.stride(1),
        stride_dya=dy_AN.stride(0),
        stride_dyn=dy_AN.stride(1),
        stride_dwe=dw_EKN.stride(0),
        stride_dwk=dw_EKN.stride(1),
        stride_dwn=dw_EKN.stride(2),
        HAS_ROWS=rows_A is not None,
        **_dot_flags(x_TK.dtype, arch),
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
    )
    _runtime.launch(_gather_mm_dw_kernel, grid, args, tile)
    return dw_EKN


class _Plan(NamedTuple):
    """What one call launches: the GPU's compute capability (None: the interpreter) and the tiles."""

    arch: int | None
    mm: Tile  # forward and input gradient; its block_m is the block table's
    dw: Tile


class _GatherGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TK, rows_A, w_EKN, groups, plan):
        ctx.save_for_backward(x_TK, rows_A, w_EKN, *groups)
        ctx.plan = plan
        return _launch_gather_mm(x_TK, rows_A, w_EKN, groups, x_TK.dtype, plan.mm, plan.arch)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_AN):
        x_TK, rows_A, w_EKN, *group_tensors = ctx.saved_tensors
        groups, plan = _Groups(*group_tensors), ctx.plan
        dx_TK = dw_EKN = None
        if ctx.needs_input_grad[0]:
            # dy_AN is already grouped, so no gather; w_EKN.transpose(1, 2) is (E, N, K) by strides only.
            # fp32 out, so that a token used by several assignments is summed before the one rounding.
            dx_AK = _launch_gather_mm(dy_AN, None, w_EKN.transpose(1, 2), groups, torch.float32, plan.mm, plan.arch)
            if rows_A is None:
                dx_TK = dx_AK.to(x_TK.dtype)
            else:
                dx_TK = torch.zeros(x_TK.shape, dtype=torch.float32, device=x_TK.device)
                dx_TK = dx_TK.index_add_(0, rows_A, dx_AK).to(x_TK.dtype)
        if ctx.needs_input_grad[2]:
            dw_EKN = _launch_gather_mm_dw(x_TK, rows_A, dy_AN, groups, w_EKN.shape[0], plan.dw, plan.arch)
        return dx_TK, None, dw_EKN, None, None


def gather_grouped_mm(
    x_TK: torch.Tensor, rows_A: torch.Tensor | None, w_EKN: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """y_AN[a] = x_TK[rows_A[a]] @ w_EKN[e(a)] where rows are grouped by expert: rows
    [off_e, off_e+counts_E[e]) use expert e. rows_A None means identity (x is already grouped, T == A).
    Differentiable w.r.t. x_TK and w_EKN.

    Args:
        x_TK: (T, K) float32, bfloat16 or float16.
        rows_A: (A,) integer row of ``x_TK`` for each assignment, sorted by expert; or None.
        w_EKN: (E, K, N) same dtype and device as ``x_TK``.
        counts_E: (E,) integer rows per expert, summing to A.

    Returns:
        (A, N) in the dtype of ``x_TK``. Costs one host sync (grid size and validation).
    """
    if x_TK.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x_TK dtype {x_TK.dtype} is not supported; supported dtypes: float32, bfloat16, float16")
    if w_EKN.dtype != x_TK.dtype:
        raise ValueError(f"w_EKN dtype {w_EKN.dtype} must equal x_TK dtype {x_TK.dtype}")
    if x_TK.dim() != 2 or w_EKN.dim() != 3:
        raise ValueError(f"x_TK must be 2-D and w_EKN 3-D, got {tuple(x_TK.shape)} and {tuple(w_EKN.shape)}")
    T, K = x_TK.shape
    E, K2, N = w_EKN.shape
    if K != K2:
        raise ValueError(f"x_TK.shape[1] = {K} must equal w_EKN.shape[1] = {K2}")
    if w_EKN.device != x_TK.device:
        raise ValueError(f"w_EKN is on {w_EKN.device} but x_TK is on {x_TK.device}")
    if counts_E.dim() != 1 or counts_E.numel() != E or counts_E.is_floating_point():
        raise ValueError(f"counts_E must be integer of shape ({E},), got {counts_E.dtype} {tuple(counts_E.shape)}")
    if rows_A is not None and (rows_A.dim() != 1 or rows_A.is_floating_point()):
        raise ValueError(f"rows_A must be a 1-D integer tensor or None, got {rows_A.dtype} {tuple(rows_A.shape)}")
    arch = _runtime.arch(x_TK.device)
    A = T if rows_A is None else rows_A.numel()
    precision = _precision(x_TK.dtype)
    plan = _Plan(arch, triton_tiles.pick("mm", arch, x_TK.dtype, precision, A, E, K, N),
                 triton_tiles.pick("dw", arch, x_TK.dtype, precision, A, E, K, N))
    with torch.no_grad():
        counts_E = counts_E.to(device=x_TK.device, dtype=torch.int64)
        if rows_A is not None:
            rows_A = rows_A.to(device=x_TK.device, dtype=torch.int64)
        groups = _make_groups(counts_E, rows_A, T, plan.mm.block_m)
    _runtime.check(x_TK.device)
    return _GatherGroupedMM.apply(x_TK, rows_A, w_EKN, groups, plan)


def grouped_mm(x_AK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]`` for rows already grouped by expert; see gather_grouped_mm."""
    return gather_grouped_mm(x_AK, None, w_EKN, counts_E)
