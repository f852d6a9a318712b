"""Per launch of the Triton grouped GEMM: does it compile for sm_90 and sm_80, which MMA instruction, registers,
spills and shared memory. Ahead of time on this machine (no GPU needed), through ``moe.kernels.triton_aot``.

    python -m moe.tools.triton_report [--arch 90 80] [--json FILE] [--markdown FILE]

Every launch the wrappers make for the standard cases (forward, input gradient, weight gradient; float32 IEEE
and TF32, bfloat16, float16; few and many rows per expert; one width not a multiple of 16) is compiled afresh
(Triton's cache skipped, so ptxas runs and ``ptxas -v`` reports registers and spills). ``shared`` is the dynamic
shared memory Triton allocates per block; ``async`` counts ``cp.async`` copies in the PTX (0: the loads are
not pipelined). Must run without TRITON_INTERPRET=1. Exit status 1 if any launch did not compile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess

import torch


def versions() -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
    for arch in (80, 90):
        try:
            text = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True).stdout
            out[f"ptxas_sm{arch}"] = text.strip().splitlines()[-1]
        except Exception as err:  # noqa: BLE001 - a version string is informative only
            out[f"ptxas_sm{arch}"] = f"unknown ({type(err).__name__})"
    return out


def _tile(t: dict) -> str:
    return f"{t['block_m']}×{t['block_n']}×{t['block_k']} w{t['num_warps']} s{t['num_stages']}"


def _cell(r: dict | None, field: str) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "no" if field == "compiles" else "-"
    if field == "compiles":
        return "yes"
    if field == "spills":
        if r["spill_store_bytes"] is None:
            return "?"
        return "0" if r["spill_store_bytes"] == r["spill_load_bytes"] == 0 else \
            f"{r['spill_store_bytes']}/{r['spill_load_bytes']} B"
    if field == "shared":
        return f"{r['shared_bytes'] // 1024} KiB"
    value = r.get(field)
    return "?" if value is None else str(value)


def markdown(records: list[dict]) -> str:
    """One row per (case, launch) with the sm_90 and sm_80 builds side by side."""
    rows: dict[tuple[str, str], dict[int, dict]] = {}
    for r in records:
        rows.setdefault((r["case"], r["role"]), {})[r["arch"]] = r
    head = ("| case | launch | tile sm_90 | sm_90 | MMA | regs | spills | shared | async | tile sm_80 | sm_80 | "
            "MMA | regs | spills | shared |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (case, role), by_arch in rows.items():
        h, a = by_arch.get(90), by_arch.get(80)
        cells = [case, role]
        for r, fields in ((h, ("compiles", "mma", "registers", "spills", "shared", "async_copies")),
                          (a, ("compiles", "mma", "registers", "spills", "shared"))):
            cells.append(_tile(r["tile"]) if r else "-")
            cells += [_cell(r, f) for f in fields]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe.tools.triton_report", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", type=int, default=[90, 80])
    parser.add_argument("--json", help="write the records (and versions) to this file")
    parser.add_argument("--markdown", help="write the table to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the kernels were built for the interpreter; unset it")
    from moe.kernels import triton_aot

    records = triton_aot.build_all(args.arch, fresh=True)
    table = markdown(records)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions(), "records": records}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    failed = [r for r in records if "error" in r]
    for r in failed:
        print(f"error: sm_{r['arch']} {r['role']} {r['case']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
