"""Plain PyTorch references for the expert ops: the ground truth every fast backend is tested against.

Shape legend:
    T tokens, D model width, F expert hidden width, E experts, A assignments (rows sorted by expert),
    K input width of a GEMM, N output width of a GEMM.

A "grouped" tensor has its rows sorted by expert: rows ``[off_e, off_e + counts_E[e])`` belong to expert
``e``, where ``off`` is the exclusive cumulative sum of ``counts_E``.
"""

from __future__ import annotations

import torch


def grouped_mm(x_AK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]`` by a loop over experts.

    Args:
        x_AK: (A, K) rows grouped by expert.
        w_EKN: (E, K, N) one weight matrix per expert.
        counts_E: (E,) int64 rows per expert, summing to A.

    Returns:
        (A, N) in the dtype of ``x_AK``.
    """
    A, K = x_AK.shape
    E, K2, N = w_EKN.shape
    assert K == K2 and counts_E.numel() == E, (x_AK.shape, w_EKN.shape, counts_E.shape)
    sizes = counts_E.tolist()
    assert sum(sizes) == A, (sum(sizes), A)
    outs = [chunk @ w_EKN[e] for e, chunk in enumerate(torch.split(x_AK, sizes, dim=0))]
    if not outs:
        return x_AK.new_zeros(A, N)
    return torch.cat(outs, dim=0)


def is_available(device: torch.device, dtype: torch.dtype, k: int, n: int) -> tuple[bool, str]:
    """The reference runs everywhere."""
    return True, ""


def gather_grouped_mm(
    x_TK: torch.Tensor, rows_A: torch.Tensor | None, w_EKN: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """``grouped_mm(x_TK[rows_A], w_EKN, counts_E)`` (rows_A None: ``x_TK`` is already grouped); the gather is a
    separate step here."""
    return grouped_mm(x_TK if rows_A is None else x_TK.index_select(0, rows_A), w_EKN, counts_E)


def swiglu(h_A2F: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a concatenated projection: the first half is the gate, the second the up projection
    (the order of ``transformers``' fused ``gate_up_proj``)."""
    gate, up = h_A2F.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def scatter_combine(y_AD: torch.Tensor, rows_A: torch.Tensor, weight_A: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``out[rows_A[a]] += weight_A[a] * y_AD[a]``, accumulated in fp32, returned in the dtype of ``y_AD``.

    Args:
        y_AD: (A, D) expert outputs.
        rows_A: (A,) the token each row belongs to.
        weight_A: (A,) combine weight of each row.
        num_tokens: T, the number of output rows.

    Returns:
        (T, D); tokens with no rows are zero.
    """
    D = y_AD.shape[1]
    acc = torch.promote_types(y_AD.dtype, torch.float32)  # float64 stays float64
    out_TD = torch.zeros(num_tokens, D, dtype=acc, device=y_AD.device)
    out_TD.index_add_(0, rows_A, y_AD.to(acc) * weight_A.to(acc).unsqueeze(1))
    return out_TD.to(y_AD.dtype)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, y, scale):  # type: ignore[override]
        ctx.save_for_backward(scale)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def scale_grad(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``y`` unchanged, with its gradient multiplied by ``scale`` (broadcast to ``y``'s shape)."""
    return _ScaleGrad.apply(y, scale)
