"""The project as a user installs it: the wheel holds one top-level name, ``moe``, and installed into a fresh
virtual environment beside Hugging Face's ``kernels`` and PyPI's ``tools`` (both top-level names we once
used ourselves) it trains, and ``transformers`` still imports its Mixtral model.

Needs the package registries (or pip's cache) for the fresh environment: about two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"

pytestmark = [pytest.mark.install, pytest.mark.slow, pytest.mark.timeout(900)]


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (setuptools writes build/ beside setup.py: not in the checkout)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("setup.py", "README.md", "moe", "kernels", "routing", "parallel", "tools", "recipes"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, src])
    (found,) = out.glob("moe_train-*.whl")
    return found


def test_wheel_installs_only_under_moe(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        (record,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        assert z.read(top_level).decode().split() == ["moe"]
        recorded = [line.split(",")[0] for line in z.read(record).decode().splitlines() if line]
    dist_info = top_level.split("/")[0]
    assert {n.split("/")[0] for n in names} == {"moe", dist_info}
    assert {n.split("/")[0] for n in recorded} == {"moe", dist_info}
    for expected in ("moe/cli.py", "moe/kernels/ops.py", "moe/kernels/triton_grouped_mm.py", "moe/routing/registry.py",
                     "moe/parallel/deepspeed/engine.py", "moe/tools/bench_layer.py", "moe/recipes/tiny.yaml",
                     "moe/hf/remote_code/modeling_moe_train.py"):
        assert expected in names, expected


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory, wheel: Path) -> Path:
    """A new virtual environment with the wheel (locked dependencies), Hugging Face's kernels and PyPI's tools."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    base = getattr(sys, "_base_executable", sys.executable)
    has_torch = subprocess.run([base, "-c", "import torch"], capture_output=True).returncode == 0
    _run([base, "-m", "venv", *(["--system-site-packages"] if has_torch else []), venv])
    py = venv / "bin" / "python"
    constraints = ["-c", LOCK] if not has_torch else []
    if not has_torch:
        torch_pin = next(line.strip() for line in LOCK.read_text().splitlines() if line.startswith("torch=="))
        _run([py, "-m", "pip", "install", "-q", *constraints, torch_pin])
    _run([py, "-m", "pip", "install", "-q", *constraints, f"{wheel}[hf]", "kernels", "tools"])
    return venv


@pytest.fixture
def outside(tmp_path: Path) -> dict:
    """Run in a folder outside the checkout, with no PYTHONPATH pointing back into it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MOE_CACHE"] = str(tmp_path / "cache")
    return {"cwd": tmp_path, "env": env}


def test_moe_help(fresh_env: Path, outside: dict):
    r = _run([fresh_env / "bin" / "moe", "--help"], **outside)
    for command in ("train", "export", "import", "upcycle", "generate", "bench"):
        assert command in r.stdout


def test_train_three_steps_of_the_tiny_recipe(fresh_env: Path, outside: dict):
    out = outside["cwd"] / "run"
    _run([fresh_env / "bin" / "moe", "train", "tiny", "--max-steps", "3", "--out", out, "--no-progress",
          "data.max_chars=200000", "train.eval_every=3", "train.eval_batches=2"], **outside)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss" in m] == [1, 2, 3]
    assert any("val_loss" in m for m in steps)
    assert (out / "model.safetensors").is_file()


def test_neighbours_keep_their_names(fresh_env: Path, outside: dict):
    """``kernels`` is Hugging Face's, ``tools`` is PyPI's, ours are under ``moe``; transformers' Mixtral runs."""
    code = """
import json, kernels, tools, torch
import moe.kernels.ops, moe.tools.bench_layer
from transformers import MixtralConfig, MixtralForCausalLM
cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
logits = MixtralForCausalLM(cfg)(torch.tensor([[1, 2, 3]])).logits
print(json.dumps({"kernels": kernels.__file__, "has_get_kernel": hasattr(kernels, "get_kernel"),
                  "tools": tools.__file__, "ops": moe.kernels.ops.__file__, "shape": list(logits.shape)}))
"""
    r = _run([fresh_env / "bin" / "python", "-c", code], **outside)
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    site = str(fresh_env)
    assert seen["has_get_kernel"] and seen["kernels"].startswith(site) and "/kernels/" in seen["kernels"]
    assert seen["tools"].startswith(site) and "/site-packages/tools/" in seen["tools"]
    assert seen["ops"].startswith(site) and seen["ops"].endswith("site-packages/moe/kernels/ops.py")
    assert seen["shape"] == [1, 3, 64]
