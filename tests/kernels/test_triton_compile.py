"""Every Triton launch of the grouped GEMM compiled ahead of time for sm_90 (Hopper) and sm_80 (Ampere), on this
CPU with no GPU and no driver: the wrappers' forward and backward on float32 (IEEE and TF32), bfloat16 and float16
at shapes that reach every tile of ``moe.kernels.triton_tiles.TABLE``, each launch specialised by Triton's own
binder and built down to a cubin with the wheel's ``ptxas`` (``moe.kernels.triton_aot``).

It runs as one subprocess: the other tests set TRITON_INTERPRET=1, which builds the kernels for the interpreter.
Triton's cache makes reruns fast; registers, spills and shared memory per launch are reported by
``tools/triton_report.py`` (docs/benchmarks.md), not here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe.kernels import triton_tiles

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    import triton  # noqa: F401  (an install requirement on Linux: a missing one fails, it does not skip)
    out = tmp_path_factory.mktemp("aot") / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "moe.kernels.triton_aot", "--arch", "90", "80", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_every_launch_compiles_for_sm90_and_sm80(records) -> None:
    failed = [f"sm_{r['arch']} {r['kernel']} {r['case']}: {r['error']}" for r in records if "error" in r]
    assert not failed, "\n".join(failed)
    for arch in (90, 80):
        kinds = {(r["kernel"], r["dtype"], r["operands"]) for r in records if r["arch"] == arch}
        for kernel in ("_gather_mm_kernel", "_gather_mm_dw_kernel"):
            for dtype, operands in (("float32", "ieee"), ("float32", "tf32"), ("bfloat16", "16bit"),
                                    ("float16", "16bit")):
                assert (kernel, dtype, operands) in kinds, (arch, kernel, dtype, operands)


def test_every_table_tile_is_chosen_by_the_wrappers_and_compiles(records) -> None:
    """The tiles compiled are the ones the wrappers pick, and together they are the whole table."""
    for r in records:
        assert tuple(r["tile"].values()) == triton_tiles.TABLE[tuple(r["table_key"])], r
    reached = {tuple(r["table_key"]) for r in records if "error" not in r}
    assert reached == set(triton_tiles.TABLE), set(triton_tiles.TABLE) - reached


def test_hopper_uses_wgmma_for_forward_input_and_weight_gradients(records) -> None:
    """sm_90 with 16-bit or TF32 operands: wgmma in every kernel, the weight gradient's included (its MMA M
    dimension is BLOCK_K, which was 32 and gave mma.sync); sm_80: mma.sync; exact fp32 ("ieee"): FMA units."""
    roles = set()
    for r in records:
        if r["operands"] == "ieee":
            assert r["mma"] == "fma", r
        else:
            assert r["mma"] == ("wgmma" if r["arch"] == 90 else "mma.sync"), r
            roles.add((r["arch"], r["role"]))
    assert roles == {(a, role) for a in (90, 80) for role in ("forward", "input_grad", "weight_grad")}


def test_aot_refuses_interpreter_mode() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "moe.kernels.triton_aot", "--arch", "90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1 is set" in proc.stderr
