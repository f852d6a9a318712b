"""Benchmark end-to-end training: tokens/s and model FLOPs utilisation per recipe and expert-parallel size.

    moe bench train [--recipes recipes/tiny.yaml ...] [--ep 1 2 4] [--steps 8] [--peak-tflops X] [--json FILE]
                    [dotted.key=value ...]        (overrides applied to every recipe)

Each (recipe, EP size) runs ``--steps`` optimizer steps in a fresh process: ``moe train`` for EP 1, the DeepSpeed
launcher with EP processes otherwise (``deepspeed --num_gpus EP --module moe.train ...``), with evaluation and
checkpoints off. The figures are medians over the steps after the first two (warm-up), read from the run's
``metrics.jsonl``; ``tokens_per_s`` counts the global batch of all processes. MFU needs the device's peak
(``--peak-tflops``, per process); it is known for common GPUs and absent on a CPU unless given.
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


def run_one(recipe: str, ep: int, steps: int, peak_tflops: float | None, out: Path, timeout: int,
            overrides: list[str] = ()) -> dict:
    args = [recipe, "--out", str(out), "--max-steps", str(steps), "--no-progress", "train.eval_every=0",
            "train.save_every=0", f"train.warmup_steps={min(2, steps)}", *overrides]
    if peak_tflops is not None:
        args.append(f"train.peak_tflops={peak_tflops}")
    if ep == 1:
        cmd = [sys.executable, "-m", "moe", "train", *args]
    else:
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        cmd = [launcher, "--num_gpus", str(ep), "--module", "moe.train", *args,
               f"parallel.expert_parallel_size={ep}"]
    record = {"recipe": recipe, "expert_parallel_size": ep, "processes": ep, "steps": steps}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    record["wall_s"] = round(time.perf_counter() - start, 1)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["recipes/tiny.yaml", "recipes/small.yaml"])
    parser.add_argument("--ep", nargs="+", type=int, default=[1, 2], help="expert-parallel sizes (= processes)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-process peak for MFU")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides for every run")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the first two are warm-up)")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            if not (ROOT / recipe).is_file():
                parser.error(f"recipe {recipe} does not exist")
            for ep in args.ep:
                r = run_one(recipe, ep, args.steps, args.peak_tflops, Path(tmp) / f"run-{len(records)}", args.timeout,
                            args.overrides)
                records.append(r)
                shown = (f"{r['tokens_per_s']:>10,.0f} tokens/s" + (f"  MFU {r['mfu']:.2%}" if "mfu" in r else "")
                         if "tokens_per_s" in r else f"error: {r['error']}")
                print(f"{recipe:24s} EP {ep}  {shown}  ({r['wall_s']} s wall)", flush=True)
    if args.json:
        from moe.tools.bench_layer import machine

        Path(args.json).write_text(json.dumps({"machine": machine(), "records": records}, indent=1))
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
