"""Run a function on N gloo processes on this machine, for distributed tests on a CPU.

    results = run_distributed("tests.parallel.test_x:checks", world_size=4, tmp_path=tmp_path, n=3)

The test starts one fresh ``python`` (never a fork of the pytest process, so no inherited threads or state)
in a session of its own. It imports torch and the target module once, then forks the N ranks: on a shared
2-core machine that saves N-1 torch imports (about 2.5 s of CPU each). NOTE: the fork happens before any
torch operator has run or any process group exists, so no thread pool or gloo thread is forked. Each rank
joins a gloo group through a ``FileStore`` (no port to race for), calls ``function(rank, world_size,
**kwargs)`` on one intra-op thread and writes the JSON-able value it returns.

Cleanup: a rank that fails gets its peers (which may be blocked in a collective it will never join) killed
after a short grace; a job that runs past ``timeout`` seconds is killed as a whole session. Either way the
test fails with every rank's output, in bounded time: a hang never blocks CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
# How long the other ranks may take to finish after one rank failed before they are killed.
_GRACE_S = 1.0


def run_distributed(target: str, world_size: int, tmp_path: Path, timeout: float = 60.0,
                    **kwargs: Any) -> list[Any]:
    """Run ``target`` ("module:function") on ``world_size`` gloo ranks; returns each rank's result.

    Raises:
        AssertionError: a rank failed or the job timed out, with every rank's output tail.
    """
    job = Path(tmp_path) / f"job_{time.monotonic_ns()}"
    job.mkdir(parents=True)
    spec = {"target": target, "world_size": world_size, "kwargs": kwargs, "collective_timeout_s": timeout}
    (job / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(job / "launcher.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.parallel.launcher", str(job)], cwd=REPO_ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # The whole session: the launcher and every rank it forked, whatever state they are in.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    codes_file = job / "exit_codes.json"
    codes = json.loads(codes_file.read_text()) if codes_file.exists() else [None] * world_size
    if timed_out or proc.returncode or any(codes):
        logs = [("launcher", job / "launcher.log")] + [(f"rank {r}", job / f"rank{r}.log") for r in range(world_size)]
        tails = "\n".join(f"--- {name} (exit {codes[i - 1] if i else proc.returncode}) ---\n"
                          f"{path.read_text()[-4000:] if path.exists() else ''}" for i, (name, path) in enumerate(logs))
        why = f"timed out after {timeout:.0f} s (a hang?)" if timed_out else f"ranks exited with {codes}"
        raise AssertionError(f"distributed job {target} on {world_size} ranks {why}\n{tails}")
    return [json.loads((job / f"rank{r}.json").read_text()) for r in range(world_size)]


def _rank_main(job: Path, spec: dict, function, rank: int) -> int:
    import torch.distributed as dist

    world_size = spec["world_size"]
    store = dist.FileStore(str(job / "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=spec["collective_timeout_s"]))
    try:
        result = function(rank, world_size, **spec["kwargs"])
    finally:
        dist.destroy_process_group()
    (job / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


def _launch(job: Path) -> int:
    import importlib

    import torch

    spec = json.loads((job / "spec.json").read_text())
    world_size = spec["world_size"]
    torch.set_num_threads(1)
    module_name, function_name = spec["target"].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for rank in range(world_size):
        pid = os.fork()
        if pid == 0:  # the rank
            code = 1
            try:
                fd = os.open(job / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                code = _rank_main(job, spec, function, rank)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)

    codes: list[int | None] = [None] * world_size
    failed_at = None
    while any(c is None for c in codes):
        for rank, pid in enumerate(pids):
            if codes[rank] is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[rank] = os.waitstatus_to_exitcode(status)
                    if codes[rank] and failed_at is None:
                        failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() > failed_at + _GRACE_S:
            for rank, pid in enumerate(pids):
                if codes[rank] is None:  # still blocked, most likely waiting for the failed rank
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    codes[rank] = -signal.SIGKILL
        time.sleep(0.02)
    (job / "exit_codes.json").write_text(json.dumps(codes))
    return 1 if any(codes) else 0


if __name__ == "__main__":
    sys.exit(_launch(Path(sys.argv[1])))
