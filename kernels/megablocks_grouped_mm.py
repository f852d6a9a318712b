"""Grouped GEMM through MegaBlocks' ``grouped_gemm`` extension (CUDA only, optional install).

Shape legend: T tokens, A rows grouped by expert, E experts, K input width, N output width.

NOTE: MegaBlocks pins one old torch and builds CUDA code, so it is an optional extra
(``pip install .[megablocks]``); this module only imports it when asked.
"""

from __future__ import annotations

import importlib

import torch


def _ops():
    return importlib.import_module("grouped_gemm.ops")


def is_available(device: torch.device, dtype: torch.dtype, k: int, n: int) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "megablocks runs on CUDA devices only"
    if dtype not in (torch.bfloat16, torch.float16):
        return False, f"megablocks grouped GEMM supports bfloat16 and float16, not {dtype}"
    try:
        _ops()
    except ImportError:
        return False, "megablocks is not installed (pip install .[megablocks])"
    return True, ""


def gather_grouped_mm(
    x_TK: torch.Tensor, rows_A: torch.Tensor | None, w_EKN: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    x_AK = x_TK if rows_A is None else x_TK.index_select(0, rows_A)
    # grouped_gemm wants the group sizes as a CPU int64 tensor.
    return _ops().gmm(x_AK, w_EKN, counts_E.to("cpu", torch.int64), trans_b=False)
