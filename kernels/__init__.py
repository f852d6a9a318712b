"""Expert ops with interchangeable backends: one function per op, chosen by name.

Shape legend: T tokens, A rows grouped by expert, E experts, K input width, N output width.

Backends:
    reference   a loop over experts in plain PyTorch: the ground truth in tests, runs everywhere.
    torch       PyTorch's ``grouped_mm`` where the installed torch supports the device, dtype and widths.
    triton      our Triton kernels, the row gather fused into the GEMM (ScatterMoE style); on a CPU only
                under ``TRITON_INTERPRET=1`` (for tests, not speed).
    megablocks  MegaBlocks' grouped GEMM, CUDA only, when the optional package is installed.
    tiled       the whole expert block (gather, both GEMMs, SwiGLU, weighted scatter) as one autograd
                function over row tiles of each expert, split between worker threads (``tiled_experts``);
                the CPU fast path. It serves ``experts_combine``; a lone grouped GEMM (expert parallelism,
                where the rows arrive already grouped) asked of it runs on ``auto``'s GEMM backend.
    auto        the fastest available for the inputs (see ``resolve_backend``, ``resolve_block_backend``).

Every backend keeps the same weight layout ``w_EKN``, so checkpoints never depend on which one ran.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from kernels import megablocks_grouped_mm, reference, tiled_experts, torch_grouped_mm
from kernels.reference import scale_grad, scatter_combine, swiglu

BACKENDS = ("reference", "torch", "triton", "megablocks", "tiled")
# Preference order of ``auto`` per device type. NOTE: Triton on a CPU runs in its interpreter, far too slow
# to pick automatically.
_AUTO_ORDER = {
    "cuda": ("triton", "torch", "megablocks", "reference"),
    "cpu": ("torch", "reference"),
}


def _triton() -> ModuleType:
    # Imported on first use: importing Triton is slow, and TRITON_INTERPRET must be set before it.
    return importlib.import_module("kernels.triton_grouped_mm")


def backend_status(name: str, device: torch.device, dtype: torch.dtype, k: int, n: int) -> tuple[bool, str]:
    """Whether backend ``name`` can run a ``(A, k) @ (E, k, n)`` grouped GEMM; if not, why."""
    if name == "reference":
        return True, ""
    if name == "torch":
        return torch_grouped_mm.is_available(device, dtype, k, n)
    if name == "triton":
        ok, why = _triton().is_available(device)
        if ok and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False, f"triton backend supports float32, bfloat16 and float16, not {dtype}"
        return ok, why
    if name == "megablocks":
        return megablocks_grouped_mm.is_available(device, dtype)
    if name == "tiled":
        return tiled_experts.is_available(device, dtype)
    raise ValueError(f"unknown expert backend {name!r}; valid: auto, {', '.join(BACKENDS)}")


def resolve_backend(name: str, x: torch.Tensor, w_EKN: torch.Tensor) -> str:
    """The concrete grouped-GEMM backend for ``name`` on these inputs; ``ValueError`` if an explicit one
    cannot run. ``tiled`` is not a GEMM backend: its lone GEMMs run on ``auto``'s choice."""
    _, k, n = w_EKN.shape
    if name in ("auto", "tiled"):
        for candidate in _AUTO_ORDER.get(x.device.type, ("reference",)):
            if backend_status(candidate, x.device, x.dtype, k, n)[0]:
                return candidate
        return "reference"
    ok, why = backend_status(name, x.device, x.dtype, k, n)
    if not ok:
        raise ValueError(f"expert backend {name!r} cannot run here: {why}; use backend 'auto' or 'reference'")
    return name


def gather_grouped_mm(
    x_TK: torch.Tensor,
    rows_A: torch.Tensor | None,
    w_EKN: torch.Tensor,
    counts_E: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``y_AN[a] = x_TK[rows_A[a]] @ w_EKN[e]`` where rows ``[off_e, off_e + counts_E[e])`` belong to expert e.

    Args:
        x_TK: (T, K) input rows.
        rows_A: (A,) int64 row of ``x_TK`` for each grouped row, or None when ``x_TK`` is already grouped.
        w_EKN: (E, K, N) expert weights.
        counts_E: (E,) int64 rows per expert, summing to A.
        backend: a name from ``BACKENDS`` or ``"auto"``.
    Returns:
        (A, N), differentiable with respect to ``x_TK`` and ``w_EKN``.
    """
    chosen = resolve_backend(backend, x_TK, w_EKN)
    if chosen == "reference":
        x_AK = x_TK if rows_A is None else x_TK.index_select(0, rows_A)
        return reference.grouped_mm(x_AK, w_EKN, counts_E)
    module = {"torch": torch_grouped_mm, "megablocks": megablocks_grouped_mm}.get(chosen) or _triton()
    return module.gather_grouped_mm(x_TK, rows_A, w_EKN, counts_E)


def resolve_block_backend(name: str, x: torch.Tensor, w_EKN: torch.Tensor) -> str:
    """The backend ``experts_combine`` runs for ``name``: ``tiled`` when asked or, under ``auto``, on a CPU;
    otherwise the grouped-GEMM backend of ``resolve_backend``."""
    if name == "tiled" or (name == "auto" and x.device.type == "cpu"):
        ok, why = tiled_experts.is_available(x.device, x.dtype)
        if ok:
            return "tiled"
        if name == "tiled":
            raise ValueError(f"expert backend 'tiled' cannot run here: {why}; use backend 'auto' or 'reference'")
    return resolve_backend(name, x, w_EKN)


def experts_combine(
    x_TD: torch.Tensor,
    rows_A: torch.Tensor,
    weight_A: torch.Tensor,
    counts_E: torch.Tensor,
    w_gate_up_ED2F: torch.Tensor,
    w_down_EFD: torch.Tensor,
    *,
    grad_scale_A: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The routed-expert block: ``out[rows_A[a]] += weight_A[a] · SwiGLU-expert_e(x_TD[rows_A[a]])``.

    Args:
        x_TD: (T, D) token activations.
        rows_A: (A,) int64 token of each assignment, grouped by expert.
        weight_A: (A,) combine weight of each assignment.
        counts_E: (E,) assignments per expert, summing to A.
        w_gate_up_ED2F: (E, D, 2F) gate projection in the first F columns, up in the last F.
        w_down_EFD: (E, F, D).
        grad_scale_A: (A,) or None: multiplies the gradient reaching the experts (and ``x_TD``) through
            each assignment, not its weight's gradient (``Routing.expert_grad_scale``).
        backend: a name from ``BACKENDS`` or ``"auto"``.
    Returns:
        (T, D) in the dtype of ``x_TD``, accumulated in fp32.
    """
    chosen = resolve_block_backend(backend, x_TD, w_gate_up_ED2F)
    if chosen == "tiled":
        return tiled_experts.experts_combine(x_TD, rows_A, weight_A, counts_E, w_gate_up_ED2F, w_down_EFD,
                                             grad_scale_A)
    h_A2F = gather_grouped_mm(x_TD, rows_A, w_gate_up_ED2F, counts_E, backend=chosen)
    y_AD = grouped_mm(swiglu(h_A2F), w_down_EFD, counts_E, backend=chosen)
    if grad_scale_A is not None:
        y_AD = scale_grad(y_AD, grad_scale_A.unsqueeze(1))
    return scatter_combine(y_AD, rows_A, weight_A, x_TD.shape[0])


def grouped_mm(x_AK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``gather_grouped_mm`` with rows already grouped by expert."""
    return gather_grouped_mm(x_AK, None, w_EKN, counts_E, backend=backend)


__all__ = [
    "BACKENDS",
    "backend_status",
    "experts_combine",
    "gather_grouped_mm",
    "grouped_mm",
    "resolve_backend",
    "resolve_block_backend",
    "scale_grad",
    "scatter_combine",
    "swiglu",
]
