"""Tile shapes of the Triton grouped GEMM (``triton_grouped_mm``), keyed by GPU generation, operand type and shape.

Shape legend: T tokens, A assignments (rows grouped by expert), E experts, K input width, N output width.

Two kernels: ``mm`` (forward, and the input gradient through the same kernel) computes (BLOCK_M rows ×
BLOCK_N) tiles of ``y_AN`` and steps over K by BLOCK_K; ``dw`` computes (BLOCK_K × BLOCK_N) tiles of
``dw_EKN[e]`` and steps over the expert's rows by BLOCK_M. The MMA's M dimension is BLOCK_M in ``mm`` and
BLOCK_K in ``dw``.

Why these tiles (``tools/triton_report.py`` shows what each compiles to; docs/benchmarks.md has its table):
- Hopper's ``wgmma`` needs an M dimension of 64 per warp group (4 warps): every sm_90 tile with 16-bit or
  TF32 operands has M = 64 · num_warps / 4. A 32-row M (the old ``dw`` tile) compiles to Ampere's
  ``mma.sync`` instead.
- Shared memory per block: stages · (M·K_step + K_step·N) · bytes per element, at most 227 KiB on sm_90
  and 163 KiB on sm_80 (the report lists each tile's figure).
- BLOCK_M is also the padding of each expert's rows in the block table (``mm``): 128-row blocks waste
  up to 127 rows per expert, so they are used only where experts get at least ``MANY_ROWS`` rows on average.
- Widths that are not multiples of 16 get no asynchronous (pipelined) copies: the loads then pass through
  registers, and the larger 16-bit tiles spilled there; they get a 64×64×32 tile (``shape_class``).
- fp32 at ``torch.get_float32_matmul_precision() == "highest"`` needs exact products ("ieee"), which no MMA
  unit gives: it runs on FMA units, with small tiles to keep the accumulator in registers.
These are starting points chosen from the compiled resources, not yet timed on a GPU: ``tools/gpu_check.sh``
times every tile of the table on the device's realistic shapes and records the fastest.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Tile(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Mean rows per expert from which ``mm`` uses 128-row blocks (padding then costs at most 1/8 of the rows).
MANY_ROWS = 512

# Under TRITON_INTERPRET=1 (CPU tests): small tiles, so that tiny test shapes span several row blocks per
# expert and several K/N tiles, exercising every mask; 16 is tl.dot's minimum. Warps and stages are ignored.
INTERPRETER = {"mm": Tile(16, 32, 32, 4, 1), "dw": Tile(16, 32, 32, 4, 1)}

# (kernel, GPU family, operands, shape class) -> tile; "any" where the tile does not depend on the shape.
TABLE: dict[tuple[str, str, str, str], Tile] = {
    ("mm", "sm90", "16bit", "many"): Tile(128, 128, 64, 8, 4),
    ("mm", "sm90", "16bit", "few"): Tile(64, 128, 64, 4, 4),
    ("mm", "sm90", "16bit", "unaligned"): Tile(64, 64, 32, 4, 2),
    ("mm", "sm90", "tf32", "many"): Tile(128, 128, 32, 8, 3),
    ("mm", "sm90", "tf32", "few"): Tile(64, 128, 32, 4, 3),
    ("mm", "sm90", "ieee", "any"): Tile(64, 64, 32, 8, 3),
    ("dw", "sm90", "16bit", "any"): Tile(64, 128, 128, 8, 3),
    ("dw", "sm90", "tf32", "any"): Tile(32, 128, 128, 8, 3),
    ("dw", "sm90", "ieee", "any"): Tile(32, 64, 64, 4, 3),
    ("mm", "sm80", "16bit", "many"): Tile(128, 128, 32, 4, 4),
    ("mm", "sm80", "16bit", "few"): Tile(64, 128, 32, 4, 4),
    ("mm", "sm80", "16bit", "unaligned"): Tile(64, 64, 32, 4, 2),
    ("mm", "sm80", "tf32", "many"): Tile(128, 128, 32, 8, 3),
    ("mm", "sm80", "tf32", "few"): Tile(64, 128, 32, 4, 3),
    ("mm", "sm80", "ieee", "any"): Tile(64, 64, 32, 8, 3),
    ("dw", "sm80", "16bit", "any"): Tile(32, 128, 128, 8, 3),
    ("dw", "sm80", "tf32", "any"): Tile(32, 128, 64, 4, 3),
    ("dw", "sm80", "ieee", "any"): Tile(32, 64, 64, 8, 3),
}


def family(arch: int) -> str:
    """The table's GPU family for a compute capability (90 for sm_90): Hopper and newer, else Ampere's tiles."""
    return "sm90" if arch >= 90 else "sm80"


def operands(dtype: torch.dtype, precision: str) -> str:
    """``16bit`` for bf16/fp16; for fp32 the dot's input precision, ``tf32`` or ``ieee``."""
    return "16bit" if dtype in (torch.bfloat16, torch.float16) else precision


def shape_class(rows: int, experts: int, k: int, n: int) -> str:
    """``unaligned`` when a width is not a multiple of 16 (Triton then cannot prove 16-byte rows, so loads are
    not asynchronous copies and not pipelined: smaller tiles keep them in registers); else ``many`` or ``few``
    rows per expert."""
    if k % 16 or n % 16:
        return "unaligned"
    return "many" if experts and rows >= MANY_ROWS * experts else "few"


def key(kernel: str, arch: int, dtype: torch.dtype, precision: str, rows: int, experts: int, k: int,
        n: int) -> tuple[str, str, str, str]:
    """The ``TABLE`` key of ``kernel`` for these operands and shapes on compute capability ``arch``."""
    head = (kernel, family(arch), operands(dtype, precision))
    shape = shape_class(rows, experts, k, n)
    # Operands without an "unaligned" tile (fp32) keep their "few" one; shape-independent tiles are "any".
    for candidate in (shape, "few", "any") if shape == "unaligned" else (shape, "any"):
        if (*head, candidate) in TABLE:
            return (*head, candidate)
    raise KeyError(f"no tile for {head} ({shape})")


def pick(kernel: str, arch: int | None, dtype: torch.dtype, precision: str, rows: int, experts: int, k: int,
         n: int) -> Tile:
    """The tile ``kernel`` (``mm`` or ``dw``) runs with on a GPU of compute capability ``arch`` (None: the
    interpreter) for ``rows`` grouped rows over ``experts`` experts of a (k -> n) GEMM."""
    if arch is None:
        return INTERPRETER[kernel]
    return TABLE[key(kernel, arch, dtype, precision, rows, experts, k, n)]
