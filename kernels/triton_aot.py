"""Compile the Triton grouped GEMM for a GPU that is not here: ahead of time, on a CPU, with no driver.

The launches come from the real wrappers (``triton_grouped_mm.gather_grouped_mm`` and its backward), run on
small CPU tensors under a ``Runtime`` that records each launch instead of running it and answers the target's
compute capability, so the tiles, flags and argument specialisations are the ones a GPU run would use. Each
recorded launch is then specialised and compiled exactly as ``triton.jit`` would on that GPU (Triton's own
binder, ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``); Triton's wheel carries
``ptxas``, so this goes down to a cubin.

Shape legend: T tokens, A assignments (rows grouped by expert), E experts, K input width, N output width.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from moe.kernels import triton_grouped_mm as tgm
from moe.kernels import triton_tiles
from moe.kernels.triton_tiles import Tile


@dataclass
class Launch:
    """One kernel launch as the wrappers made it."""

    kernel: object  # the @triton.jit function (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: dict
    tile: Tile

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


class Recorder(tgm.Runtime):
    """Answers ``arch`` for every device and keeps the launches instead of running them."""

    def __init__(self, arch: int) -> None:
        self._arch = arch
        self.launches: list[Launch] = []

    def arch(self, device: torch.device) -> int:
        return self._arch

    def check(self, device: torch.device) -> None:
        if tgm._TRITON_IMPORT_ERROR is not None:
            raise RuntimeError(f"triton cannot be imported: {tgm._TRITON_IMPORT_ERROR}")

    def launch(self, kernel, grid, args, tile) -> None:
        self.launches.append(Launch(kernel, grid, dict(args), tile))


@contextlib.contextmanager
def recording(arch: int) -> Iterator[Recorder]:
    """Inside the block the wrappers record their launches for compute capability ``arch`` (no kernel runs;
    outputs hold garbage)."""
    with tgm.use_runtime(Recorder(arch)) as recorder:
        yield recorder


@dataclass(frozen=True)
class Case:
    """One call of the wrappers: forward and backward of a gathered (``gather``) or grouped GEMM."""

    dtype: torch.dtype
    precision: str  # torch.set_float32_matmul_precision: "highest" (ieee) or "high" (tf32)
    counts: tuple[int, ...]
    K: int
    N: int
    gather: bool

    @property
    def label(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        if self.dtype == torch.float32:
            dt += "-" + ("ieee" if self.precision == "highest" else "tf32")
        rows = sum(self.counts)
        return f"{dt} {'gather' if self.gather else 'grouped'} A={rows} E={len(self.counts)} K={self.K} N={self.N}"


def record_case(case: Case, arch: int) -> list[Launch]:
    """The launches of one forward + backward (x and w both need gradients) of ``case`` on ``arch``."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor(case.counts)
    A, E = int(counts.sum()), len(case.counts)
    T = max(A // 2, 1) if case.gather else A
    x = torch.zeros(T, case.K, dtype=case.dtype, requires_grad=True)
    w = torch.zeros(E, case.K, case.N, dtype=case.dtype, requires_grad=True)
    rows = torch.randint(0, T, (A,), generator=gen) if case.gather else None
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(case.precision)
    try:
        with recording(arch) as rec:
            y = tgm.gather_grouped_mm(x, rows, w, counts)
            y.backward(torch.zeros_like(y))
    finally:
        torch.set_float32_matmul_precision(saved)
    return rec.launches


@dataclass
class Build:
    """A launch compiled for one GPU."""

    arch: int
    kernel: str
    tile: Tile
    signature: dict
    constexprs: dict
    seconds: float
    mma: str  # "wgmma", "mma.sync" or "fma" (no MMA instruction in the PTX)
    shared_bytes: int
    registers: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    ptxas_log: str = ""
    ptx: str = field(default="", repr=False)
    ttir: str = field(default="", repr=False)


def _jit_function(kernel):
    """The ``JITFunction`` of a kernel; under TRITON_INTERPRET=1 ``triton.jit`` made an InterpretedFunction, so
    one is built from the same Python function (these kernels call no other @triton.jit function)."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def specialise(launch: Launch, arch: int) -> tuple[object, dict, dict, dict, dict]:
    """What ``triton.jit`` would compile for this launch on ``arch``: (fn, signature, constexprs, attrs,
    options), through Triton's own argument binder (types, the value-1 and divisible-by-16 specialisations)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(launch.kernel)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    opts = {"num_warps": launch.tile.num_warps, "num_stages": launch.tile.num_stages}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**launch.args, **opts)
    options, signature, constexprs, attrs = fn._pack_args(backend, opts, bound, specialization, options)
    return fn, signature, constexprs, attrs, options.__dict__


def mma_instruction(ptx: str) -> str:
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "fma"


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(launch: Launch, arch: int, fresh: bool = True) -> Build:
    """Compile ``launch`` for compute capability ``arch`` down to a cubin; raises what Triton raises. ``fresh``
    skips Triton's cache (ptxas then runs and its ``-v`` log gives registers and spills; a cache hit has none)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, options = specialise(launch, arch)
    log = io.StringIO()
    start = time.perf_counter()
    with knobs.nvidia.scope(), knobs.compilation.scope(), knobs.runtime.scope(), contextlib.redirect_stdout(log):
        knobs.runtime.interpret = False  # TRITON_INTERPRET=1 (the CPU tests) changes how the front end builds IR
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills (printed on a real compile only)
        knobs.compilation.always_compile = fresh
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
    seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spill = _PTXAS_SPILL.search(text)
    named = {fn.arg_names[k[0]]: v for k, v in constexprs.items()}
    return Build(arch=arch, kernel=launch.name, tile=launch.tile, signature=signature, constexprs=named,
                 seconds=seconds, mma=mma_instruction(compiled.asm["ptx"]), shared_bytes=compiled.metadata.shared,
                 registers=int(regs.group(1)) if regs else None,
                 spill_store_bytes=int(spill.group(1)) if spill else None,
                 spill_load_bytes=int(spill.group(2)) if spill else None,
                 ptxas_log=text.strip(), ptx=compiled.asm["ptx"], ttir=compiled.asm["ttir"])


def launch_key(launch: Launch, arch: int) -> str:
    """Two launches with the same key compile to the same binary."""
    _, signature, constexprs, attrs, options = specialise(launch, arch)
    return repr((launch.name, arch, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                 options["num_warps"], options["num_stages"]))


# Rows per expert on either side of triton_tiles.MANY_ROWS (E = 4, one expert empty), so that every tile of the
# table is chosen; realistic aligned widths, and one width that is not a multiple of 16 (no async copies then).
_FEW = (40, 0, 88, 32)
_MANY = (600, 0, 1500, 500)
_OPERANDS = ((torch.bfloat16, "highest"), (torch.float16, "highest"), (torch.float32, "high"),
             (torch.float32, "highest"))


def standard_cases() -> list[Case]:
    """Forward + backward calls that together reach every tile of ``triton_tiles.TABLE`` for a GPU family."""
    cases = [Case(dtype, precision, counts, 256, 512, gather)
             for dtype, precision in _OPERANDS for counts in (_FEW, _MANY) for gather in (True, False)]
    cases.append(Case(torch.bfloat16, "highest", _FEW, 100, 40, True))
    return cases


def table_key(launch: Launch, case: Case, arch: int) -> tuple[str, str, str, str]:
    """The ``triton_tiles.TABLE`` key the wrappers looked up for this launch."""
    kernel = "dw" if launch.name == "_gather_mm_dw_kernel" else "mm"
    precision = "ieee" if case.precision == "highest" else "tf32"
    return triton_tiles.key(kernel, arch, case.dtype, precision, sum(case.counts), len(case.counts), case.K, case.N)


# What each of a case's launches computes, in launch order (forward, then backward: dx before dw).
ROLES = ("forward", "input_grad", "weight_grad")


def build_all(archs: list[int], cases: list[Case] | None = None, fresh: bool = False) -> list[dict]:
    """Record every case on every arch and compile each distinct launch once. One record per launch: the
    Build's fields (without the PTX), the case label, its role, the table key, or ``error`` when it did not
    compile; a launch that compiles to the same binary as an earlier one carries ``repeat_of``.
    ``fresh`` skips Triton's cache, so that ptxas runs and reports registers and spills."""
    records, seen = [], {}
    for arch in archs:
        for case in cases or standard_cases():
            for role, launch in zip(ROLES, record_case(case, arch), strict=True):
                record = {"arch": arch, "case": case.label, "role": role, "kernel": launch.name,
                          "tile": launch.tile._asdict(), "table_key": list(table_key(launch, case, arch)),
                          "operands": triton_tiles.operands(case.dtype, "ieee" if case.precision == "highest"
                                                            else "tf32"),
                          "dtype": str(case.dtype).removeprefix("torch."), "grid": list(launch.grid)}
                key = launch_key(launch, arch)
                if key in seen:  # the same binary as an earlier launch: its results, marked as a repeat
                    records.append({**seen[key], **record, "repeat_of": seen[key]["case"]})
                    continue
                try:
                    build = compile_launch(launch, arch, fresh=fresh)
                except Exception as err:  # noqa: BLE001 - every failure is reported, none stops the others
                    record["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
                else:
                    record.update(mma=build.mma, shared_bytes=build.shared_bytes, registers=build.registers,
                                  spill_store_bytes=build.spill_store_bytes, spill_load_bytes=build.spill_load_bytes,
                                  async_copies=len(re.findall(r"cp\.async\.c[ag]", build.ptx)),
                                  seconds=round(build.seconds, 2), constexprs=build.constexprs)
                seen[key] = record
                records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    """``python -m moe.kernels.triton_aot [--arch 90 80] [--fresh] [--json FILE]``: compile every launch the
    wrappers make for the standard cases; exit status 1 if any failed to compile."""
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(prog="python -m moe.kernels.triton_aot", description=main.__doc__)
    parser.add_argument("--arch", nargs="+", type=int, default=[90, 80], help="compute capabilities (90 = sm_90)")
    parser.add_argument("--fresh", action="store_true", help="skip Triton's cache (ptxas then reports registers)")
    parser.add_argument("--json", help="write the records to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the kernels were built for the interpreter; unset it")
    records = build_all(args.arch, fresh=args.fresh)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    failed = [r for r in records if "error" in r]
    for r in failed:
        print(f"error: sm_{r['arch']} {r['kernel']} {r['case']}: {r['error']}")
    distinct = sum("repeat_of" not in r for r in records)
    print(f"{len(records)} launches, {distinct} distinct, {len(failed)} failed to compile, for "
          f"{', '.join(f'sm_{a}' for a in args.arch)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
