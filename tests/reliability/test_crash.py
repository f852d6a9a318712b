"""Crash safety: ``moe train`` killed with SIGKILL (no handler runs, nothing is flushed on the way out) at a
random step, or in the middle of writing a checkpoint, then continued with ``--resume``: every step's loss
equals an uninterrupted run's, bit for bit, and no step is logged twice.

The steps to kill at are drawn from a seed, printed with each trial (pytest shows it on failure); set
``MOE_CRASH_SEED`` to replay a failing trial. Three trials: two kills at a random step, one during a save.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from moe.checkpoint import verify_checkpoint
from moe.cli import main
from tests.reliability.common import RECIPE, ROOT, moe_command, small, step_losses, subprocess_env

STEPS = 20
SEED = int(os.environ.get("MOE_CRASH_SEED") or random.SystemRandom().randrange(10**6))


def _args(out: Path, cache: Path, save_every: int) -> list[str]:
    return ["train", RECIPE, "--out", str(out), "--no-progress",
            *small(cache, f"train.steps={STEPS}", f"train.save_every={save_every}", "train.keep_checkpoints=2")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache) -> tuple[Path, list[tuple[int, float]]]:
    """The uninterrupted run (in-process, checkpoint only at the end), and the data cache it filled."""
    tmp = tmp_path_factory.mktemp("crash")
    assert main(_args(tmp / "reference", data_cache, save_every=0)) == 0
    losses = step_losses(tmp / "reference")
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    return data_cache, losses


def _last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((int(line.split('"step": ')[1].split(",")[0]) for line in lines if '"loss"' in line), default=0)


def _kill_when(args: list[str], out: Path, ready, what: str) -> bool:
    """Start ``moe train ARGS`` and SIGKILL it as soon as ``ready()`` is true (polled every ~0.5 ms); False
    when the run finished first."""
    out.mkdir(parents=True)
    log = out.parent / f"{out.name}.stderr"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(moe_command(*args), cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                stderr=stderr)
        deadline = time.monotonic() + 180
        try:
            while not ready():
                if proc.poll() is not None:
                    assert proc.returncode == 0, f"the run failed before {what}: {log.read_text()[-2000:]}"
                    return False
                if time.monotonic() > deadline:
                    pytest.fail(f"MOE_CRASH_SEED={SEED}: {what} did not happen within 180 s")
                time.sleep(0.0005)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return True


def _resume_and_compare(out: Path, cache: Path, save_every: int, reference_losses, context: str) -> None:
    assert main([*_args(out, cache, save_every), "--resume"]) == 0, context
    losses = step_losses(out)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)), f"{context}: a step is missing or repeated"
    diff = [(s, a, b) for (s, a), (_, b) in zip(losses, reference_losses) if a != b]
    assert not diff, f"{context}: losses differ from the uninterrupted run at (step, resumed, reference) {diff[:3]}"


@pytest.mark.parametrize("trial", [0, 1])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(trial, reference, tmp_path):
    cache, reference_losses = reference
    save_every = 4
    target = random.Random(SEED * 10 + trial).randint(save_every + 1, STEPS - 3)
    out = tmp_path / "run"
    print(f"crash trial {trial}: MOE_CRASH_SEED={SEED}, SIGKILL once step {target} is logged")
    assert _kill_when(_args(out, cache, save_every), out, lambda: _last_step(out) >= target, f"step {target}"), \
        f"MOE_CRASH_SEED={SEED}: the run finished before step {target}"
    killed = _last_step(out)
    latest = (out / "checkpoints" / "latest").read_text()
    context = f"MOE_CRASH_SEED={SEED} trial {trial}: killed after step {killed}, resuming from {latest}"
    print(context)
    # The newest save at or before the last logged step; or the one before it, when the kill came between
    # logging a step and finishing that step's save (metrics are written first).
    newest = killed // save_every * save_every
    allowed = {newest} | ({newest - save_every} if killed == newest else set())
    assert latest in {f"step_{s:08d}" for s in allowed}, context
    _resume_and_compare(out, cache, save_every, reference_losses, context)


def test_sigkill_during_a_checkpoint_save_then_resume_is_bit_identical(reference, tmp_path):
    """Saves every step; the kill comes once a save's temporary folder ``.step_*`` holds ``files`` files (0 to
    2 of the 5, drawn from the seed), before the save renames it into place and moves ``latest``: the previous
    checkpoint must be the one resumed, and the next save must remove the partial folder."""
    cache, reference_losses = reference
    rng = random.Random(SEED * 10 + 2)
    target, files = rng.randint(3, STEPS - 6), rng.randint(0, 2)
    print(f"crash trial 2: MOE_CRASH_SEED={SEED}, SIGKILL in a checkpoint save from step {target} on, once its "
          f"temporary folder holds {files} files")
    for attempt in range(3):  # a save takes milliseconds: the kill may land just after it (then try again)
        out = tmp_path / f"run{attempt}"
        ckpts = out / "checkpoints"

        def saving() -> bool:
            if _last_step(out) < target or not ckpts.is_dir():
                return False
            with os.scandir(ckpts) as entries:
                partial = [e.path for e in entries if e.name.startswith(".step_")]
            try:
                return any(len(os.listdir(p)) >= files for p in partial)
            except FileNotFoundError:  # renamed into place meanwhile
                return False

        killed = _kill_when(_args(out, cache, save_every=1), out, saving, f"a checkpoint save after step {target}")
        partial = [p for p in ckpts.iterdir() if p.name.startswith(".step_")] if killed else []
        if partial:
            break
    assert partial, f"MOE_CRASH_SEED={SEED}: 3 runs, no kill landed inside a save"
    saving_step = int(partial[0].name.split(".")[1].removeprefix("step_"))
    latest = (ckpts / "latest").read_text()
    context = (f"MOE_CRASH_SEED={SEED} trial 2 (attempt {attempt}): killed while writing {partial[0].name} "
               f"(holding {sorted(p.name for p in partial[0].iterdir())}), latest is {latest}")
    print(context)
    assert latest == f"step_{saving_step - 1:08d}", context  # the interrupted save never became `latest`
    verify_checkpoint(ckpts / latest)
    _resume_and_compare(out, cache, 1, reference_losses, context)
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")], "temporary folders left behind"
