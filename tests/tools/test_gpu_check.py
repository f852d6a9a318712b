"""The device check's wiring on this CPU (``tools/gpu_check.sh --dry-run``) and the tools it runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moe.tools import torch_api_check, triton_report

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_one_json_and_a_log(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env={**__import__("os").environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert summary["ok"] and summary["dry_run"]
    required = ["environment", "pytest_gpu", "backends", "bench_layer", "train"]
    assert [s["name"] for s in summary["steps"] if s["required"]] == required
    assert all(steps[name]["ok"] for name in required)
    assert steps["tiles"]["skipped"].startswith("not part of the dry run")
    env = steps["environment"]["result"]
    assert env["torch_api_check"][-1].endswith("torch names used by the code exist")
    backends = {r["backend"]: r for r in steps["backends"]["result"]["records"]}
    for name in ("reference", "torch", "triton", "auto"):  # triton runs under the interpreter here
        assert backends[name]["ok"] and set(backends[name]["errors"]) == {"out", "dx", "dw_gate_up", "dw_down",
                                                                            "dweight"}
    assert "megablocks" in backends["megablocks"]["skipped"]
    impls = {r["impl"] for r in steps["bench_layer"]["result"]["records"] if "median_ms" in r}
    assert {"dense-swiglu", "ours-auto", "hf-mixtral-grouped_mm"} <= impls
    (train,) = steps["train"]["result"]["records"]
    assert train["tokens_per_s"] > 0 and train["steps"] == 3
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {name}: ok" in log for name in required)


def test_unknown_argument_is_a_one_line_error():
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--fast"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: unknown argument --fast; valid: --dry-run, --out DIR"


def test_a_real_run_without_wheels_stops_before_doing_anything(tmp_path):
    env = {**__import__("os").environ, "MOE_WHEELS": str(tmp_path / "none"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error: no wheels in" in proc.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_torch_api_check_finds_every_name_here_and_reports_a_missing_one(tmp_path):
    names = torch_api_check.used_names(torch_api_check.source_files())
    assert {"torch.distributed.all_to_all_single", "torch.nn.functional.silu", "torch.cuda.is_available"} <= set(names)
    assert all(torch_api_check.resolve(name) for name in names)
    planted = tmp_path / "planted.py"
    planted.write_text("import torch.nn.functional as F\nfrom torch import nn\n"
                       "y = F.no_such_op(1)\nz = nn.Linear\n")
    found = torch_api_check.used_names([planted])
    assert {"torch.nn.functional.no_such_op", "torch.nn.Linear"} <= set(found)
    assert not torch_api_check.resolve("torch.nn.functional.no_such_op")
    assert torch_api_check.resolve("torch.nn.Linear")


def test_triton_report_table_pairs_sm90_and_sm80_builds():
    tile = {"block_m": 64, "block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 4}
    base = {"case": "bfloat16 gather", "role": "forward", "tile": tile, "shared_bytes": 98304,
            "spill_store_bytes": 0, "spill_load_bytes": 0, "async_copies": 48}
    records = [{**base, "arch": 90, "mma": "wgmma", "registers": 117},
               {**base, "arch": 80, "mma": "mma.sync", "registers": 164, "spill_store_bytes": 8,
                "spill_load_bytes": 4},
               {**base, "role": "weight_grad", "arch": 90, "error": "PTXASError: out of registers"}]
    lines = triton_report.markdown(records).splitlines()
    assert len(lines) == 4
    assert lines[2] == ("| bfloat16 gather | forward | 64×128×64 w4 s4 | yes | wgmma | 117 | 0 | 96 KiB | 48 | "
                        "64×128×64 w4 s4 | yes | mma.sync | 164 | 8/4 B | 96 KiB |")
    assert lines[3].startswith("| bfloat16 gather | weight_grad | 64×128×64 w4 s4 | no | - |")


def test_gpu_recipe_is_a_few_hundred_million_parameters_trained_in_bf16_through_deepspeed():
    import torch

    from moe.config import load_recipe
    from moe.model import MoEModel

    recipe = load_recipe("recipes/gpu.yaml")
    with torch.device("meta"):
        model = MoEModel(recipe.model)
    assert 300e6 < model.num_parameters() < 500e6 and model.num_parameters(active=True) < 0.3 * model.num_parameters()
    assert recipe.parallel.zero_stage >= 1 and recipe.train.dtype in ("auto", "bfloat16") and recipe.train.steps == 100
