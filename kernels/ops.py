"""Expert ops, one function per op, each running the backend named by ``backend`` (see ``moe.kernels.backends``).

Shape legend: T tokens, A rows grouped by expert, E experts, K input width, N output width, D model width,
F expert hidden width.
"""

from __future__ import annotations

import torch

from moe.kernels.backends import BLOCK_BACKENDS, backend_module, resolve_backend, resolve_block_backend
from moe.kernels.reference import scale_grad, scatter_combine, swiglu


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
    return backend_module(chosen).gather_grouped_mm(x_TK, rows_A, w_EKN, counts_E)


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
    if chosen in BLOCK_BACKENDS:
        return backend_module(chosen).experts_combine(x_TD, rows_A, weight_A, counts_E, w_gate_up_ED2F, w_down_EFD,
                                                      grad_scale_A)
    h_A2F = gather_grouped_mm(x_TD, rows_A, w_gate_up_ED2F, counts_E, backend=chosen)
    y_AD = grouped_mm(swiglu(h_A2F), w_down_EFD, counts_E, backend=chosen)
    if grad_scale_A is not None:
        y_AD = scale_grad(y_AD, grad_scale_A.unsqueeze(1))
    return scatter_combine(y_AD, rows_A, weight_A, x_TD.shape[0])


def grouped_mm(x_AK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``gather_grouped_mm`` with rows already grouped by expert."""
    return gather_grouped_mm(x_AK, None, w_EKN, counts_E, backend=backend)
