"""The tile table's rules (what each tile compiles to is tests/kernels/test_triton_compile.py's business)."""

import torch

from moe.kernels import triton_tiles
from moe.kernels.triton_tiles import TABLE, Tile

SHARED_LIMIT = {"sm90": 227 * 1024, "sm80": 163 * 1024}  # bytes of shared memory one block may use


def test_hopper_tiles_have_a_wgmma_m_dimension():
    """wgmma multiplies 64 rows per warp group (4 warps): the MMA's M (BLOCK_M in mm, BLOCK_K in dw) must be
    64 per warp group, or Triton falls back to mma.sync (the old dw tile's BLOCK_K = 32 did)."""
    for (kernel, fam, operands, _), t in TABLE.items():
        if fam == "sm90" and operands != "ieee":
            m = t.block_m if kernel == "mm" else t.block_k
            assert m % 64 == 0 and m >= 64 * (t.num_warps // 4), (kernel, operands, t)


def test_pipelined_operands_fit_in_shared_memory():
    for (kernel, fam, operands, _), t in TABLE.items():
        size = 2 if operands == "16bit" else 4
        step = t.block_m * t.block_k + (t.block_k * t.block_n if kernel == "mm" else t.block_m * t.block_n)
        assert t.num_stages * step * size <= SHARED_LIMIT[fam], (kernel, fam, operands, t)


def test_pick_by_family_operands_and_shape():
    bf16, f32 = torch.bfloat16, torch.float32
    pick = triton_tiles.pick
    assert pick("mm", 90, bf16, "tf32", 64 * 600, 64, 2048, 2816) == TABLE[("mm", "sm90", "16bit", "many")]
    assert pick("mm", 90, bf16, "tf32", 64 * 100, 64, 2048, 2816) == TABLE[("mm", "sm90", "16bit", "few")]
    assert pick("mm", 100, bf16, "tf32", 10, 1, 2048, 2816) == TABLE[("mm", "sm90", "16bit", "few")]
    assert pick("mm", 86, torch.float16, "tf32", 10, 1, 100, 40) == TABLE[("mm", "sm80", "16bit", "unaligned")]
    assert pick("mm", 90, f32, "tf32", 10, 1, 100, 40) == TABLE[("mm", "sm90", "tf32", "few")]
    assert pick("mm", 90, f32, "ieee", 10**6, 1, 64, 64) == TABLE[("mm", "sm90", "ieee", "any")]
    assert pick("dw", 80, bf16, "tf32", 10, 1, 64, 64) == TABLE[("dw", "sm80", "16bit", "any")]
    assert pick("dw", None, bf16, "tf32", 10, 1, 64, 64) == triton_tiles.INTERPRETER["dw"]
    assert all(isinstance(t, Tile) for t in TABLE.values())
