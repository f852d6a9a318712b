"""The one-shot device check's steps, each a subprocess with a time limit, into one JSON and one log.
``tools/gpu_check.sh`` installs the carried wheels and runs this; see docs/gpu_check.md.

    python -m moe.tools.gpu_check --out DIR [--dry-run] [--budget SECONDS]

Steps, the required ones first (each gets at most its own limit and what is left of the budget; an optional
step that would get less than a minute is skipped and says so):
    environment     GPU, driver, package versions, the carried packages import, torch API check (torch 2.11)
    pytest_gpu      ``pytest -m gpu`` over the whole suite
    backends        every backend vs the reference in bf16 at realistic shapes, outputs and all gradients
    bench_layer     ``moe bench layer`` GPU cases vs the dense SwiGLU, transformers' experts, MegaBlocks
    train           ``moe bench train``: recipes/gpu.yaml (399 M parameters, bf16, DeepSpeed ZeRO 1), 100 steps
    pytest_kernels  (optional) the kernel tests, which run on the GPU where there is one
    tiles           (optional) each Triton tile candidate timed at the realistic shapes
``--dry-run`` runs the same steps on this machine with tiny sizes (a CPU: no GPU test runs, Triton runs under
its interpreter, training is the tiny recipe for 3 steps) to prove the wiring. Exit status 1 if a required step
failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# The tiny model of tests/tools/test_bench.py, for the dry run's training step.
_TINY = ["model.vocab_size=320", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
         "model.num_kv_heads=1", "model.moe.num_experts=4", "model.moe.expert_hidden_size=16",
         "data.max_chars=60000", "train.micro_batch_size=2", "train.seq_len=16"]
GPU_LAYER_CASES = ["T16384-D2048-E64k8-F1408", "T4096-D4096-E8k2-F14336"]


@dataclass
class Step:
    name: str
    required: bool
    limit_s: int
    gpu: list[str] | None  # the command on a GPU machine; {out} is the output folder
    dry: list[str] | None  # the command in a dry run; None: not run in a dry run (the reason is recorded)
    json_file: str | None = None


STEPS = [
    Step("environment", True, 60, [PY, "-m", "moe.tools.gpu_check", "--environment", "{out}/environment.json"],
         [PY, "-m", "moe.tools.gpu_check", "--environment", "{out}/environment.json"], "environment.json"),
    Step("pytest_gpu", True, 120, [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
         [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]),
    Step("backends", True, 150, [PY, "-m", "moe.tools.gpu_backends", "--json", "{out}/backends.json"],
         [PY, "-m", "moe.tools.gpu_backends", "--dry-run", "--repeats", "1", "--json", "{out}/backends.json"],
         "backends.json"),
    Step("bench_layer", True, 120, [PY, "-m", "moe", "bench", "layer", "--cases", *GPU_LAYER_CASES, "--repeats", "5",
                                     "--json", "{out}/bench_layer.json"],
         [PY, "-m", "moe", "bench", "layer", "--cases", "smoke-T256-D64-E4k2-F32", "--impls", "dense-swiglu",
          "ours-auto", "ours-torch", "hf-mixtral-grouped_mm", "--repeats", "1", "--json", "{out}/bench_layer.json"],
         "bench_layer.json"),
    Step("train", True, 240, [PY, "-m", "moe", "bench", "train", "--recipes", "recipes/gpu.yaml", "--ep", "1",
                               "--zero", "1", "--steps", "100", "--timeout", "230", "--json", "{out}/train.json"],
         [PY, "-m", "moe", "bench", "train", "--recipes", "recipes/tiny.yaml", "--ep", "1", "--zero", "1",
          "--steps", "3", "--json", "{out}/train.json", *_TINY, "data.cache_dir={out}/cache"], "train.json"),
    Step("pytest_kernels", False, 150, [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels",
                                         "--deselect", "tests/kernels/test_triton_compile.py"], None),
    Step("tiles", False, 150, [PY, "-m", "moe.tools.gpu_backends", "--tiles", "--json", "{out}/tiles.json"],
         None, "tiles.json"),
]


def environment(path: str) -> int:
    """Versions, the GPU, whether the carried packages import, and the torch API check; written to ``path``."""
    info: dict = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "triton", "transformers", "deepspeed", "datasets", "tokenizers", "safetensors",
                 "megablocks", "pyarrow"):
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as err:  # noqa: BLE001 - reported, the step fails below for required ones
            info[name] = f"not importable: {type(err).__name__}: {err}".splitlines()[0][:200]
    import torch

    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        info["nvidia_smi"] = f"unavailable: {type(err).__name__}"
    check = subprocess.run([PY, "-m", "moe.tools.torch_api_check"], cwd=ROOT, capture_output=True, text=True)
    info["torch_api_check"] = check.stdout.strip().splitlines()
    Path(path).write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    needed = ("torch", "triton", "deepspeed", "datasets")
    return 1 if check.returncode or any(str(info[n]).startswith("not importable") for n in needed) else 0


def run_step(step: Step, out: Path, dry: bool, left_s: float, log) -> dict:
    command = step.dry if dry else step.gpu
    record: dict = {"name": step.name, "required": step.required}
    if command is None:
        record["skipped"] = "not part of the dry run (needs a GPU)"
        return record
    limit = int(min(step.limit_s, left_s))
    if limit < (30 if step.required else 60):
        record["skipped"] = f"{int(left_s)} s left of the budget"
        return record
    command = [part.replace("{out}", str(out)) for part in command]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONUNBUFFERED": "1"}
    record.update(command=" ".join(command), limit_s=limit)
    print(f"\n===== {step.name}: {record['command']} (limit {limit} s)", file=log, flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
        record["rc"] = proc.returncode
    except subprocess.TimeoutExpired:
        record["rc"] = None
        record["timed_out"] = True
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["ok"] = record["rc"] == 0
    if step.json_file and (out / step.json_file).exists():
        try:
            record["result"] = json.loads((out / step.json_file).read_text())
        except json.JSONDecodeError as err:
            record["result_error"] = str(err)
    print(f"===== {step.name}: {'ok' if record['ok'] else 'FAILED'} in {record['seconds']} s", file=log, flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe.tools.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json, gpu_check.log and "
                        "each step's JSON")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on this machine (a CPU)")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all steps (default 450: the check "
                        "must end within 8 minutes on a bare H100, wheels included)")
    parser.add_argument("--environment", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.environment:
        return environment(args.environment)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    steps = []
    with open(out / "gpu_check.log", "a") as log:
        for step in STEPS:
            left = args.budget - (time.perf_counter() - start)
            record = run_step(step, out, args.dry_run, left, log)
            steps.append(record)
            status = record.get("skipped") or ("ok" if record["ok"] else "FAILED")
            print(f"{step.name:15s} {status}" + (f" ({record['seconds']} s)" if "seconds" in record else ""),
                  flush=True)
            summary = {"dry_run": args.dry_run, "budget_s": args.budget,
                       "total_s": round(time.perf_counter() - start, 1), "steps": steps,
                       "ok": all(s.get("ok", False) for s in steps if s["required"])}
            (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.log'} in {summary['total_s']} s")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
