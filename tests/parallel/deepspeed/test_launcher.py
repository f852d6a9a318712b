"""THE end-to-end checks: the real ``deepspeed`` launcher reproduces a one-process run, and its ZeRO-0 checkpoint
resumes on one process through the commands a user types (``moe train ... --resume`` and
``deepspeed --num_gpus 1 ... --resume``)."""

from __future__ import annotations

import json
import os
import re
import shutil
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

# The load-balancing loss is a statistic of each micro-batch: off, 2 ranks of B=2 equal one process of B=4.
EXTRA = ["model.moe.router.aux_loss_coef=0"]
BIN = Path(sys.executable).parent  # the virtual environment's console scripts: deepspeed, moe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float = 180) -> str:
    """Run ``cmd`` as a user would (from the repository root); its output. Fails the test on a non-zero exit."""
    # No OMP_NUM_THREADS, as in a user's shell: the engine gives each rank its share of the cores.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = f"timed out after {timeout} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks, whatever state they are in
        except ProcessLookupError:
            pass
        proc.wait()
    print(f"{Path(cmd[0]).name} {cmd[1:3]}: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """``one``: the trainer on one process, B=4. ``two``: ``deepspeed --num_gpus 2`` (expert parallel 2, ZeRO 0,
    B=2 per rank), the same 4 steps, checkpoints after steps 2 and 4."""
    from moe.trainer import train

    root = tmp_path_factory.mktemp("launcher")
    train(small_recipe(cache, *EXTRA, "train.micro_batch_size=4"), root / "one", progress=False)
    output = _run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
                   "moe.train", "recipes/tiny.yaml", "--out", str(root / "two"), "--no-progress", *SMALL,
                   f"data.cache_dir={cache}", *EXTRA, "train.micro_batch_size=2", "parallel.expert_parallel_size=2",
                   "train.save_every=2"])
    return root, output


def test_deepspeed_launcher_reproduces_one_process(runs):
    """``deepspeed --num_gpus 2 --module moe.train`` (expert parallel 2, B=2 per rank) logs the losses of
    ``moe.trainer.train`` on one process with B=4."""
    root, output = runs
    assert output.count("\ndone: 4 steps") == 1, output[-3000:]  # one summary, from rank 0
    # Each rank takes its share of the cores (share_cores): 2 ranks with 2 threads each on 2 cores spun in
    # OpenMP's barriers, 6x slower at ZeRO 0 (docs/benchmarks.md).
    threads = re.search(r"2 ranks on this machine: (\d+) intra-op thread", output)
    assert threads and int(threads[1]) <= max(1, len(os.sched_getaffinity(0)) // 2), output[-3000:]
    rel = max_rel(run_losses(root / "two"), run_losses(root / "one"))
    print(f"2 ranks (EP 2) vs 1 process, same global batch: max rel loss diff {rel:.1e}")
    assert rel <= 1e-5
    weights = load_file(root / "two" / "model.safetensors")
    assert weights["layers.0.mlp.experts.w_gate_up_ED2F"].shape == (4, 32, 32)  # gathered from both ranks


@pytest.mark.slow
@pytest.mark.parametrize("how", ["moe train", "deepspeed --num_gpus 1"])
def test_a_two_rank_zero0_checkpoint_resumes_on_one_process_as_typed(runs, cache, tmp_path, how):
    """The 2-rank run, stopped after its step-2 checkpoint, resumed on ONE process by the command as a user types
    it, without the expert-parallel override and with the global batch kept (B=4): experts and AdamW state are
    re-sharded, steps 3 and 4 match the run that was never on 2 ranks."""
    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "two", run)
    # What a crash right after the step-2 checkpoint leaves (the step-4 checkpoint and records not yet written).
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "latest").write_text("step_00000002")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= 2))
    (run / "model.safetensors").unlink()

    args = ["recipes/tiny.yaml", "--out", str(run), "--resume", "--no-progress", *SMALL, f"data.cache_dir={cache}",
            *EXTRA, "train.micro_batch_size=4", "train.save_every=2"]
    if how == "moe train":
        cmd = [str(BIN / "moe"), "train", *args]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(_free_port()), "--module",
               "moe.train", *args]
    output = _run(cmd)
    assert "written with expert parallel 2 on 2 ranks, at expert parallel 1 on 1 ranks" in output, output[-3000:]
    assert output.count("\ndone: 2 steps (steps 3-4, resumed from step 2)") == 1, output[-3000:]
    moved, one = run_losses(run), run_losses(root / "one")
    assert sorted(moved) == [1, 2, 3, 4]
    rel = max_rel({s: moved[s] for s in (3, 4)}, {s: one[s] for s in (3, 4)})
    print(f"{how}: steps 3-4 after moving 2 ranks -> 1 process vs never moved: max rel loss diff {rel:.1e}")
    assert rel <= 1e-5
    assert (run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt").is_file()  # still DeepSpeed's
    assert load_file(run / "model.safetensors")["layers.0.mlp.experts.w_gate_up_ED2F"].shape == (4, 32, 32)
