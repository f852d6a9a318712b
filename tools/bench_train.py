"""Benchmark end-to-end training: tokens/s and model FLOPs utilisation per recipe, expert-parallel size and ZeRO
stage.

    moe bench train [--recipes recipes/tiny.yaml ...] [--ep 1 2 4] [--zero 0 1 2] [--steps 8] [--peak-tflops X]
                    [--json FILE] [dotted.key=value ...]        (overrides applied to every recipe)

Each (recipe, EP size, ZeRO stage) runs ``--steps`` optimizer steps in a fresh process: ``moe train`` for EP 1, the
DeepSpeed launcher with EP processes otherwise (``deepspeed --num_gpus EP --module moe.train ...``), with
``parallel.zero_stage`` set to the stage (above 0, DeepSpeed runs even at EP 1; without ``--zero``, each recipe's
own stage), and evaluation and checkpoints
off. The figures are medians over the steps after the first two (warm-up), read from the run's ``metrics.jsonl``;
``tokens_per_s`` counts the global batch of all processes. MFU needs the device's peak (``--peak-tflops``, per
process); it is known for common GPUs and absent on a CPU unless given. The EP=2 ZeRO 0/1/2 table of
docs/benchmarks.md:

    moe bench train --recipes recipes/tiny.yaml --ep 2 --zero 0 1 2 --steps 10 --json bench_zero.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# DeepSpeed refuses its MoE layers under ZeRO-3 (moe.parallel.deepspeed.engine); the stages a run can use.
ZERO_STAGES = (0, 1, 2)
# Set by --ep and --zero for each run; an override of them would contradict the table.
OWNED = ("parallel.expert_parallel_size", "parallel.zero_stage")


def run_one(recipe: str, ep: int, steps: int, peak_tflops: float | None, out: Path, timeout: int,
            overrides: list[str] = (), zero: int = 0) -> dict:
    args = [recipe, "--out", str(out), "--max-steps", str(steps), "--no-progress", "train.eval_every=0",
            "train.save_every=0", f"train.warmup_steps={min(2, steps)}", *overrides, f"parallel.zero_stage={zero}"]
    if peak_tflops is not None:
        args.append(f"train.peak_tflops={peak_tflops}")
    if ep == 1:
        cmd = [sys.executable, "-m", "moe", "train", *args]
    else:
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        cmd = [launcher, "--num_gpus", str(ep), "--module", "moe.train", *args,
               f"parallel.expert_parallel_size={ep}"]
    record = {"recipe": recipe, "expert_parallel_size": ep, "zero_stage": zero, "processes": ep, "steps": steps}
    load_before = os.getloadavg()[0]  # other work on the machine changes the figure: recorded with it
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    record["wall_s"] = round(time.perf_counter() - start, 1)
    record["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before and after the run
    if proc.returncode != 0:
        record["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return record
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    timed = rows[2:] or rows
    record["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in timed), 1)
    if all("mfu" in r for r in timed):
        record["mfu"] = float(f"{statistics.median(r['mfu'] for r in timed):.4g}")  # 4 significant digits
    record["final_loss"] = rows[-1]["loss"]
    return record


def _recipe_stage(recipe: str) -> int:
    """The ZeRO stage a recipe file sets (``parallel.zero_stage``)."""
    from moe.config import load_recipe

    return load_recipe(ROOT / recipe).parallel.zero_stage


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2 (argparse prints its usage first)
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="moe bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["recipes/tiny.yaml", "recipes/small.yaml"])
    parser.add_argument("--ep", nargs="+", type=int, default=[1, 2], help="expert-parallel sizes (= processes)")
    parser.add_argument("--zero", nargs="+", type=int, default=None,
                        help="ZeRO stages: 0, 1, 2 (default: each recipe's parallel.zero_stage)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-process peak for MFU")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides for every run")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the first two are warm-up)")
    bad_ep = [ep for ep in args.ep if ep < 1]
    if bad_ep:
        parser.error(f"--ep {bad_ep[0]}: expert-parallel sizes are positive integers (processes), e.g. --ep 1 2")
    bad_zero = [z for z in args.zero or () if z not in ZERO_STAGES]
    if bad_zero:
        parser.error(f"--zero {bad_zero[0]}: valid stages are {' '.join(map(str, ZERO_STAGES))} (DeepSpeed does not "
                     "support MoE layers under ZeRO-3)")
    owned = [o for o in args.overrides if o.split("=", 1)[0] in OWNED]
    if owned:
        parser.error(f"{owned[0]}: set by --ep and --zero for each run; give the sizes and stages there")
    missing = [r for r in args.recipes if not (ROOT / r).is_file()]
    if missing:
        parser.error(f"recipe {missing[0]} does not exist")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            for ep in args.ep:
                for zero in args.zero or [_recipe_stage(recipe)]:
                    r = run_one(recipe, ep, args.steps, args.peak_tflops, Path(tmp) / f"run-{len(records)}",
                                args.timeout, args.overrides, zero)
                    records.append(r)
                    shown = (f"{r['tokens_per_s']:>10,.0f} tokens/s" + (f"  MFU {r['mfu']:.2%}" if "mfu" in r else "")
                             if "tokens_per_s" in r else f"error: {r['error']}")
                    print(f"{recipe:24s} EP {ep}  ZeRO {zero}  {shown}  ({r['wall_s']} s wall)", flush=True)
    if args.json:
        from moe.tools.bench_layer import machine

        from importlib import metadata

        info = {**machine(), "deepspeed": metadata.version("deepspeed")}
        Path(args.json).write_text(json.dumps({"machine": info, "records": records}, indent=1))
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
