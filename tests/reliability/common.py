"""Shared by the reliability tests: a tiny recipe, running the ``moe`` command in-process or as a subprocess,
and reading per-step losses back from ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "tiny.yaml")

# A model of ~30k parameters on 60k characters of the default corpus (as tests/moe/test_trainer.py's SMALL).
SMALL = ["model.vocab_size=320", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
         "model.num_kv_heads=1", "model.moe.num_experts=4", "model.moe.expert_hidden_size=16",
         "data.max_chars=60000", "train.micro_batch_size=2", "train.seq_len=16", "train.warmup_steps=2",
         "train.eval_batches=2", "train.log_every=2", "train.eval_every=0"]


def small(cache: Path, *extra: str) -> list[str]:
    """``SMALL`` with the tokenised-data cache at ``cache`` and ``extra`` overrides."""
    return [*SMALL, f"data.cache_dir={cache}", *extra]


def subprocess_env() -> dict[str, str]:
    # One intra-op thread, as the in-process tests use (conftest.py): losses of a subprocess and of an
    # in-process run are then bit-identical, and the shared CPU is not oversubscribed.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1"}


def moe_command(*args: str, optimize: bool = False) -> list[str]:
    """``python [-O] -m moe ARGS``: the command as a user types it."""
    return [sys.executable, *(["-O"] if optimize else []), "-m", "moe", *args]


def run_moe(*args: str, optimize: bool = False, pycache: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """``python [-O] -m moe ARGS`` from the repository root.

    Args:
        pycache: with ``optimize``, where ``-O`` bytecode (``*.opt-1.pyc``, which the installed packages lack)
            is written and reused, so that only the first ``-O`` run compiles torch's sources (~5 s).
    """
    env = subprocess_env()
    if optimize and pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return subprocess.run(moe_command(*args, optimize=optimize), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def step_losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training record of ``run/metrics.jsonl``, in file order (repeats would show)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]
