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

# The registry: backend name -> the module that implements it. Every module offers
# ``is_available(device, dtype, k, n) -> (ok, why not)``; the grouped-GEMM backends ``gather_grouped_mm(x_TK,
# rows_A, w_EKN, counts_E)`` and the block backend (``tiled``) ``experts_combine``. Imported on first use:
# importing Triton is slow, and TRITON_INTERPRET must be set before it.
BACKEND_MODULES = {
    "reference": "moe.kernels.reference",
    "torch": "moe.kernels.torch_grouped_mm",
    "triton": "moe.kernels.triton_grouped_mm",
    "megablocks": "moe.kernels.megablocks_grouped_mm",
    "tiled": "moe.kernels.tiled_experts",
}
BACKENDS = tuple(BACKEND_MODULES)
# The backends that run the whole expert block (``experts_combine``); their lone GEMMs run on ``auto``'s choice.
BLOCK_BACKENDS = ("tiled",)
# Preference order of ``auto`` per device type. NOTE: Triton on a CPU runs in its interpreter, far too slow
# to pick automatically.
_AUTO_ORDER = {
    "cuda": ("triton", "torch", "megablocks", "reference"),
    "cpu": ("torch", "reference"),
}


def backend_module(name: str) -> ModuleType:
    """The module of backend ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown expert backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    return importlib.import_module(BACKEND_MODULES[name])


def backend_status(name: str, device: torch.device, dtype: torch.dtype, k: int, n: int) -> tuple[bool, str]:
    """Whether backend ``name`` can run a ``(A, k) @ (E, k, n)`` grouped GEMM; if not, why."""
    return backend_module(name).is_available(device, dtype, k, n)


def resolve_backend(name: str, x: torch.Tensor, w_EKN: torch.Tensor) -> str:
    """The concrete grouped-GEMM backend for ``name`` on these inputs; ``ValueError`` if an explicit one
    cannot run. ``tiled`` is not a GEMM backend: its lone GEMMs run on ``auto``'s choice."""
    _, k, n = w_EKN.shape
    if name == "auto" or name in BLOCK_BACKENDS:
        for candidate in _AUTO_ORDER.get(x.device.type, ("reference",)):
            if backend_status(candidate, x.device, x.dtype, k, n)[0]:
                return candidate
        return "reference"
    ok, why = backend_status(name, x.device, x.dtype, k, n)
    if not ok:
        raise ValueError(f"expert backend {name!r} cannot run here: {why}; use backend 'auto' or 'reference'")
    return name


def resolve_block_backend(name: str, x: torch.Tensor, w_EKN: torch.Tensor) -> str:
    """The backend ``experts_combine`` runs for ``name``: a block backend when asked or, under ``auto``, on a CPU
    (``tiled``); otherwise the grouped-GEMM backend of ``resolve_backend``."""
    _, k, n = w_EKN.shape
    wanted = name if name in BLOCK_BACKENDS else "tiled" if name == "auto" and x.device.type == "cpu" else None
    if wanted is not None:
        ok, why = backend_status(wanted, x.device, x.dtype, k, n)
        if ok:
            return wanted
        if name == wanted:
            raise ValueError(f"expert backend {name!r} cannot run here: {why}; use backend 'auto' or 'reference'")
    return resolve_backend(name, x, w_EKN)
