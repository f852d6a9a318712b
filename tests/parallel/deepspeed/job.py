"""The shared 2-rank job of the DeepSpeed tests (``tests/parallel/deepspeed/test_*.py``), and its helpers.

The DeepSpeed engine on 2 gloo processes: DeepSpeed's expert tags, ZeRO 0/1/2, exact resume, and the
DeepSpeed launcher (``deepspeed --num_gpus 2 --module moe.train``) reproducing a one-process run.

One spawned job (``deepspeed_checks``, through ``tests.parallel.launcher``) runs the trainer on 2 ranks at ZeRO
stages 0, 1 and 2 with expert parallelism 2, resumes two of the runs from a checkpoint, and checks the tags;
the tests below assert on its results. The launcher test (``test_launcher.py``) starts the real ``deepspeed`` command.

What "equal" means here:

* a 2-process run and the 1-process run of the same global batch (``micro_batch_size`` × 2): per-step losses
  within 1e-5 relative (measured: about 1e-7). The experts see the same rows in the same order (bitwise, see
  ``test_expert_parallel``); the dense gradients are sums of the two ranks' partial sums (fp32 rounding). The
  comparison runs with ``aux_loss_coef=0``: the load-balancing loss is a statistic of each micro-batch (f·P
  over its tokens), so with it on, 2 ranks of B sequences equal 1 process accumulating 2 micro-batches of B
  (checked too, same tolerance), not one micro-batch of 2B.
* ZeRO 1 and 2 against ZeRO 0: within 1e-4 relative (the same update; DeepSpeed's flat fp32 partitions and
  reduce-scatter add in another order).
* a run resumed from its step-2 checkpoint: steps 3 and 4 bit-identical to the uninterrupted run (weights,
  AdamW state, RNG and step come back exactly; the sampler is a function of the step).
* a run moved between layouts (2 ranks, expert parallel 2 → 4 ranks, EP 4 → 1 process, EP 1, the global
  batch kept at 4 sequences, load-balancing loss off as above): every step within 1e-5 of the run that never
  moved. Not bitwise: the dense gradients are reduced over another number of ranks.

The same job forges checkpoints (a pickle that would create a file, planted in a DeepSpeed checkpoint with its
manifest rewritten) and fails writes during saves (ENOSPC on one rank), with the engines it has built anyway.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import time
from pathlib import Path

# Imported here, not in the rank functions: the launcher imports this module once and forks the ranks from it,
# so the ranks share these imports (DeepSpeed's and the trainer's take seconds of CPU each) instead of repeating
# them on a 2-core machine.
import moe.trainer  # noqa: F401
import moe.parallel.deepspeed.engine  # noqa: F401
from tests.parallel.launcher import REPO_ROOT
from tests.exploit import Exploit, plant

SMALL = ["model.vocab_size=320", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
         "model.num_kv_heads=1", "model.moe.num_experts=4", "model.moe.expert_hidden_size=16",
         "data.max_chars=60000", "train.seq_len=16", "train.warmup_steps=2", "train.eval_batches=2",
         "train.log_every=2", "train.steps=4"]


def small_recipe(cache: Path, *extra: str):
    from moe.config import load_recipe

    return load_recipe(REPO_ROOT / "recipes/tiny.yaml", SMALL + [f"data.cache_dir={cache}", *extra])


def run_losses(run: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if "loss" in r}


def job_losses(results: list, run: str, key: str = "loss") -> dict[int, float]:
    """Rank 0's per-step ``key`` of ``run`` in the job."""
    return {r["step"]: r[key] for r in results[0]["runs"][run]}


def max_rel(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


def _crash_copy(rank: int, src: Path, dst: Path, step: int) -> None:  # noqa: D103
    """``dst``: the run ``src`` as a crash right after its step-``step`` checkpoint would have left it."""
    import torch.distributed as dist

    if rank == 0:
        tag = f"step_{step:08d}"
        (dst / "checkpoints").mkdir(parents=True)
        shutil.copytree(src / "checkpoints" / tag, dst / "checkpoints" / tag)
        (dst / "checkpoints" / "latest").write_text(tag)
        lines = (src / "metrics.jsonl").read_text().splitlines()
        (dst / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= step))
    dist.barrier()


def _tags(rank: int, cache: Path) -> dict:
    """Which parameters carry DeepSpeed's expert marks, as DeepSpeed itself reads them."""
    from deepspeed.moe.utils import is_moe_param, is_moe_param_group

    from moe.model import MoEModel
    from moe.parallel.deepspeed.engine import DeepSpeedEngine

    recipe = small_recipe(cache, "parallel.expert_parallel_size=2", "train.micro_batch_size=2")
    model = MoEModel(recipe.model)
    engine = DeepSpeedEngine(model, recipe)
    out = {"expert": [], "dense_marked": [], "moe_groups": [], "dense_groups_with_experts": 0,
           "has_moe_layers": engine.ds.has_moe_layers, "num_experts": engine.ds.num_experts}
    for name, p in model.named_parameters():
        if is_moe_param(p):
            out["expert"].append([name, p.group_name, list(p.shape)])
        elif hasattr(p, "group_name") or hasattr(p, "allreduce"):
            out["dense_marked"].append(name)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in engine.optimizer.param_groups:
        if is_moe_param_group(group):
            out["moe_groups"].append([group["name"], sorted(names[id(p)] for p in group["params"])])
        else:
            out["dense_groups_with_experts"] += sum(is_moe_param(p) for p in group["params"])
    return out


def _skip_and_step(rank: int, cache: Path, stage: int, run: Path, work: Path) -> dict:
    """The engine alone: rank 1 asks to skip a step whose gradients are finite; then a normal step. Then the
    same engine (the layout of ``run``) resumes forged copies of ``run``'s checkpoint and, at ZeRO 0, saves
    with failing writes (under ``work``)."""
    import math

    import torch

    from moe.model import MoEModel
    from moe.parallel.deepspeed.engine import DeepSpeedEngine

    recipe = small_recipe(cache, "parallel.expert_parallel_size=2", "train.micro_batch_size=2",
                     f"parallel.zero_stage={stage}")
    torch.manual_seed(0)
    model = MoEModel(recipe.model)
    engine = DeepSpeedEngine(model, recipe)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(rank))

    def forward_backward_step(skip: bool) -> list:
        before = [p.detach().clone() for p in model.parameters()]
        result = engine.model(ids, ids)
        engine.backward(result.loss + result.aux_loss)
        norm, stepped = engine.step(1e-3, skip=skip)
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        return [norm if math.isfinite(norm) else None, stepped, changed]

    out = {"skip": forward_backward_step(skip=rank == 1), "step": forward_backward_step(skip=False)}
    start = time.perf_counter()
    out["planted"] = _forged_resumes(rank, engine, run, work / "forged", PLANTED[stage])
    if stage == 0:
        out["save_faults"] = _save_faults(rank, engine, work / "faults" / "checkpoints")
    out["seconds_forged_and_faults"] = round(time.perf_counter() - start, 1)
    return out




def _plant(path: Path, marker: Path, container: str) -> None:
    """``path``: a pickle creating ``marker`` when unpickled, as ``torch.save`` writes it (``zip``), in a dict
    that also holds what DeepSpeed's ZeRO files hold (``zip_with_deepspeed_classes``: the allow-listed classes do
    not vouch for the rest), or as a plain pickle (``legacy``, which ``torch.load`` reads too)."""
    import torch

    payload: dict = {"module": {"w": torch.zeros(2)}, "exploit": Exploit(str(marker))}
    if container == "zip_with_deepspeed_classes":
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        payload.update(loss_scaler=LossScaler(1.0), zero_stage=ZeroStageEnum.gradients,
                       address=fragment_address(numel=4, start=0))
    plant(path, payload, container)


# What each forged copy of a step-2 checkpoint gets: {case: (file to replace or add, container)}. Rank 0 loads
# mp_rank_00 at every stage, rank 1 its experts (layer_1_expert_3: ranks 0-1 hold experts 0-1, 2-3) and its own
# ZeRO partition; the subfolder file is what DeepSpeed's universal checkpoints hold, unlisted in the manifest.
PLANTED = {
    0: {"model_states": ("mp_rank_00_model_states.pt", "zip"),
        "expert_legacy_pickle": ("layer_1_expert_3_mp_rank_00_model_states.pt", "legacy")},
    2: {"zero_partition": ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "zip_with_deepspeed_classes"),
        "universal_subfolder": ("zero/model.layers.0.attn.q.weight/fp32.pt", "zip")},
}


def _forged_resumes(rank: int, engine, run: Path, work: Path, cases: dict) -> dict:
    """``engine.resume`` of forged copies of ``run``'s step-2 checkpoint (the manifest rewritten to match):
    {case: [the error, whether the pickle ran]}, and whether each payload is live (rank 0 unpickles a copy)."""
    import torch
    import torch.distributed as dist

    from moe.checkpoint import write_manifest

    out: dict = {}
    tag = "step_00000002"
    for case, (name, container) in cases.items():
        root = work / case / "checkpoints"
        if rank == 0:
            shutil.copytree(run / "checkpoints" / tag, root / tag)
            (root / "latest").write_text(tag)
            _plant(root / tag / name, work / case / "pwned", container)
            write_manifest(root / tag)  # every hash matches: the manifest proves integrity, not authorship
            probe = work / case / "probe.pt"  # the same payload is live: an unsafe load runs it
            _plant(probe, work / case / "ran_in_probe", container)
            with contextlib.suppress(RuntimeError):  # a plain pickle fails torch.load after it ran
                torch.load(probe, weights_only=False)
        dist.barrier()
        try:
            engine.resume(root)
            error = None
        except Exception as e:  # a ValueError; anything else (DeepSpeed loading the forgery) fails the test
            error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        dist.barrier()
        out[case] = {"error": error, "ran": (work / case / "pwned").exists(),
                     "probe_ran": (work / case / "ran_in_probe").exists()}
    return out


def _disk_full(real):
    """A writer that writes half the file, then fails as a full disk does."""
    def save(self, state_dict, path):
        real(self, state_dict, path)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return save


def _save_faults(rank: int, engine, root: Path) -> dict:
    """Save step 2, then step 3 with DeepSpeed's writer failing on rank 1 (ENOSPC, half the file written), then
    step 4 with rank 0's RNG file refused (EACCES); then resume. Every rank reports what it saw."""
    import torch.distributed as dist
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    import moe.parallel.deepspeed.checkpoint as pd
    from moe.checkpoint import verify_checkpoint

    out: dict = {"errors": {}}
    engine.save(root, 2, keep=3)
    def rng_write_fails(tensors, filename, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", filename)

    faults = {3: (1, TorchCheckpointEngine, "save", _disk_full(TorchCheckpointEngine.save)),
              4: (0, pd, "save_file", rng_write_fails)}
    for step, (faulty_rank, owner, name, replacement) in faults.items():
        real = getattr(owner, name)
        if rank == faulty_rank:
            setattr(owner, name, replacement)
        try:
            engine.save(root, step, keep=3)
            out["errors"][step] = None
        except RuntimeError as e:
            out["errors"][step] = str(e)
        finally:
            setattr(owner, name, real)
        dist.barrier()
        out.setdefault("listing", {})[step] = sorted(p.name for p in root.iterdir())
    out["latest"] = (root / "latest").read_text()
    if rank == 0:
        verify_checkpoint(root / "step_00000002")
    out["writer_restored"] = type(engine.ds.checkpoint_engine).__name__
    out["resumed_at"] = engine.resume(root)
    return out


def _pickled_globals(runs: list[Path]) -> dict:
    """Per run: {kind of file: the globals outside torch's weights-only set its checkpoint files name}."""
    import re

    import torch

    out: dict = {}
    for run in runs:
        kinds: dict = {}
        for path in sorted(run.glob("checkpoints/step_*/*.pt")):
            kind = re.sub(r"\d+", "N", path.name)
            kinds.setdefault(kind, set()).update(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        out[run.name] = {k: sorted(v) for k, v in kinds.items()}
    return out


def _poisoned_run(rank: int, cache: Path, out: Path) -> list:
    """The trainer at ZeRO 0, rank 1's second training loss NaN: every rank skips that step."""
    from moe.model import MoEModel
    from moe.trainer import train

    real_forward, calls = MoEModel.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):
        result = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2 and self.training:
            result.loss = result.loss * float("nan")
        return result

    MoEModel.forward = poisoned
    try:
        train(small_recipe(cache, "parallel.expert_parallel_size=2", "train.micro_batch_size=2", "train.steps=3"), out,
              progress=False)
    finally:
        MoEModel.forward = real_forward
    return _records(out)


def _records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "skipped_steps")} for r in records if "loss" in r]


def resume_leg(rank: int, world_size: int, src: str, dst: str, step: int, cache: str, overrides: list[str]) -> list:
    """Resume ``src``'s step-``step`` checkpoint (copied to ``dst``) on this job's ranks with ``overrides``."""
    from moe.trainer import train

    _crash_copy(rank, Path(src), Path(dst), step)
    train(small_recipe(Path(cache), *MOVED, *overrides), Path(dst), resume=True, progress=False)
    return _records(Path(dst))


# The run that moves between layouts: 6 steps, a checkpoint after each, a global batch of 4 sequences.
MOVED = ["model.moe.router.aux_loss_coef=0", "train.steps=6", "train.save_every=1", "train.keep_checkpoints=6"]


def deepspeed_checks(rank: int, world_size: int, root: str, cache: str) -> dict:
    from moe.trainer import train

    root_p, cache_p = Path(root), Path(cache)
    clock = time.perf_counter()
    out: dict = {"tags": _tags(rank, cache_p), "runs": {}, "skip": {}, "errors": {}, "seconds": {}}

    def lap(name: str) -> None:
        nonlocal clock
        out["seconds"][name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    lap("tags")
    ep = ["parallel.expert_parallel_size=2", "train.micro_batch_size=2"]
    for stage in (0, 1, 2):
        run = root_p / f"zero{stage}"
        train(small_recipe(cache_p, *ep, f"parallel.zero_stage={stage}", "train.save_every=2"), run, progress=False)
        out["runs"][f"zero{stage}"] = _records(run)
        lap(f"zero{stage}")
        if stage in (0, 2):  # exact resume from the step-2 checkpoint
            resumed = root_p / f"zero{stage}_resumed"
            _crash_copy(rank, run, resumed, 2)
            train(small_recipe(cache_p, *ep, f"parallel.zero_stage={stage}", "train.save_every=2"), resumed,
                  resume=True, progress=False)
            out["runs"][f"zero{stage}_resumed"] = _records(resumed)
            lap(f"zero{stage}_resumed")
            out["skip"][stage] = _skip_and_step(rank, cache_p, stage, run, root_p / f"engine{stage}")
            lap(f"skip{stage}")
    out["runs"]["poisoned"] = _poisoned_run(rank, cache_p, root_p / "poisoned")
    lap("poisoned")
    train(small_recipe(cache_p, *MOVED, *ep), root_p / "moved_full", progress=False)
    out["runs"]["moved_full"] = _records(root_p / "moved_full")
    lap("moved_full")
    for name, extra in {"zero3": [*ep, "parallel.zero_stage=3"],
                        "ep3_on_2_ranks": ["model.moe.num_experts=6", "parallel.expert_parallel_size=3"]}.items():
        try:
            train(small_recipe(cache_p, *extra), root_p / name, progress=False)
        except ValueError as e:
            out["errors"][name] = str(e)
    # ZeRO 2's optimizer partitions at another expert-parallel size: refused, nothing loaded.
    _crash_copy(rank, root_p / "zero2", root_p / "zero2_ep1", 2)
    try:
        train(small_recipe(cache_p, "parallel.zero_stage=2", "train.micro_batch_size=2", "train.save_every=2"),
              root_p / "zero2_ep1", resume=True, progress=False)
    except ValueError as e:
        out["errors"]["zero2_reshard"] = str(e)
    lap("errors")
    if rank == 0:
        out["globals"] = _pickled_globals([root_p / f"zero{stage}" for stage in (0, 1, 2)])
    lap("globals")
    return out
