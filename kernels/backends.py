"""Expert backends by name: which can run here, and what ``auto`` picks (read by ``moe.kernels.ops``).

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

from moe.kernels import megablocks_grouped_mm, tiled_experts, torch_grouped_mm

BACKENDS = ("reference", "torch", "triton", "megablocks", "tiled")
# Preference order of ``auto`` per device type. NOTE: Triton on a CPU runs in its interpreter, far too slow
# to pick automatically.
_AUTO_ORDER = {
    "cuda": ("triton", "torch", "megablocks", "reference"),
    "cpu": ("torch", "reference"),
}


def triton_module() -> ModuleType:
    # Imported on first use: importing Triton is slow, and TRITON_INTERPRET must be set before it.
    return importlib.import_module("moe.kernels.triton_grouped_mm")


def backend_status(name: str, device: torch.device, dtype: torch.dtype, k: int, n: int) -> tuple[bool, str]:
    """Whether backend ``name`` can run a ``(A, k) @ (E, k, n)`` grouped GEMM; if not, why."""
    if name == "reference":
        return True, ""
    if name == "torch":
        return torch_grouped_mm.is_available(device, dtype, k, n)
    if name == "triton":
        ok, why = triton_module().is_available(device)
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
