"""Grouped GEMM through PyTorch's own ``grouped_mm`` (``torch.nn.functional.grouped_mm``, or the private
``torch._grouped_mm`` of releases before it was public).

Shape legend: T tokens, A rows grouped by expert, E experts, K input width, N output width.

Measured on torch 2.13 CPU: fp32, bf16 and fp16 work, forward and backward, empty groups included, but
only when the row strides of both operands are multiples of 16 bytes (K and N multiples of 4 in fp32,
of 8 in bf16); float64 is refused. ``is_available`` checks this so that ``auto`` never picks it where it
would fail.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe.kernels import reference

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _function() -> Callable | None:
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def is_available(device: torch.device, dtype: torch.dtype, k: int, n: int) -> tuple[bool, str]:
    """Whether the torch backend can run a ``(A, k) @ (E, k, n)`` grouped GEMM in ``dtype`` on ``device``."""
    if _function() is None:
        return False, f"torch {torch.__version__} has no grouped_mm (it needs torch >= 2.8)"
    if dtype not in _SUPPORTED:
        return False, f"torch grouped_mm supports float32, bfloat16 and float16, not {dtype}"
    size = torch.tensor([], dtype=dtype).element_size()
    if (k * size) % 16 or (n * size) % 16:
        return False, f"torch grouped_mm needs widths whose rows are multiples of 16 bytes (got {k} and {n} in {dtype})"
    if device.type == "cuda" and dtype != torch.bfloat16 and not hasattr(torch.nn.functional, "grouped_mm"):
        return False, "torch._grouped_mm on CUDA supports only bfloat16"
    return True, ""


def gather_grouped_mm(
    x_TK: torch.Tensor, rows_A: torch.Tensor | None, w_EKN: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """``y_AN = x_TK[rows_A] @ w_EKN[e]`` per group; autograd comes from PyTorch's own op."""
    x_AK = x_TK if rows_A is None else x_TK.index_select(0, rows_A)
    if x_AK.shape[0] == 0:
        # NOTE: grouped_mm's backward fails on zero rows ("Invalid strides/sizes"); the reference gives the
        # empty result still connected to the weights (their gradient is exactly zero).
        return reference.grouped_mm(x_AK, w_EKN, counts_E)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return _function()(x_AK, w_EKN, offs=offs_E)
