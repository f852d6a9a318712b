"""THE end-to-end check: the real ``deepspeed`` launcher reproduces a one-process run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.parallel.deepspeed.job import SMALL, max_rel, run_losses, small_recipe
from tests.parallel.launcher import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_launcher_reproduces_one_process(cache, tmp_path):
    """THE end-to-end check: ``deepspeed --num_gpus 2 --module moe.train`` (expert parallel 2, B=2 per rank)
    logs the losses of ``moe.trainer.train`` on one process with B=4."""
    from moe.trainer import train

    extra = ["model.moe.router.aux_loss_coef=0"]
    one = tmp_path / "one"
    train(small_recipe(cache, *extra, "train.micro_batch_size=4"), one, progress=False)

    run = tmp_path / "two"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "moe.train",
           "recipes/tiny.yaml", "--out", str(run), "--no-progress", *SMALL, f"data.cache_dir={cache}", *extra,
           "train.micro_batch_size=2", "parallel.expert_parallel_size=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        output = "timed out after 180 s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, whatever state they are in
        except ProcessLookupError:
            pass
        proc.wait()
    print(f"deepspeed launcher, 2 ranks: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, output[-6000:]
    assert output.count("\ndone: 4 steps") == 1, output[-3000:]  # one summary, from rank 0
    rel = max_rel(run_losses(run), run_losses(one))
    print(f"2 ranks (EP 2) vs 1 process, same global batch: max rel loss diff {rel:.1e}")
    assert rel <= 1e-5
    weights = load_file(run / "model.safetensors")
    assert weights["layers.0.mlp.experts.w_gate_up_ED2F"].shape == (4, 32, 32)  # gathered from both ranks
    # one process without DeepSpeed cannot read DeepSpeed's checkpoint, and says how to
    with pytest.raises(ValueError, match="was written by DeepSpeed: resume it with DeepSpeed"):
        train(small_recipe(cache, *extra, "train.micro_batch_size=4"), run, resume=True, progress=False)
