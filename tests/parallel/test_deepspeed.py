"""The DeepSpeed engine on 2 gloo processes: DeepSpeed's expert tags, ZeRO 0/1/2, exact resume, and the
DeepSpeed launcher (``deepspeed --num_gpus 2 --module moe.train``) reproducing a one-process run.

One spawned job (``deepspeed_checks``, through ``tests.parallel.launcher``) runs the trainer on 2 ranks at ZeRO
stages 0, 1 and 2 with expert parallelism 2, resumes two of the runs from a checkpoint, and checks the tags;
the tests below assert on its results. The launcher test starts the real ``deepspeed`` command.

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
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

# Imported here, not in the rank functions: the launcher imports this module once and forks the ranks from it,
# so the ranks share these imports (DeepSpeed's and the trainer's take seconds of CPU each) instead of repeating
# them on a 2-core machine.
import moe.train  # noqa: F401
import moe.parallel.deepspeed  # noqa: F401
from tests.parallel.launcher import REPO_ROOT, run_distributed
from tests.exploit import Exploit

SMALL = ["model.vocab_size=320", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
         "model.num_kv_heads=1", "model.moe.num_experts=4", "model.moe.expert_hidden_size=16",
         "data.max_chars=60000", "train.seq_len=16", "train.warmup_steps=2", "train.eval_batches=2",
         "train.log_every=2", "train.steps=4"]


def _recipe(cache: Path, *extra: str):
    from moe.config import load_recipe

    return load_recipe(REPO_ROOT / "recipes/tiny.yaml", SMALL + [f"data.cache_dir={cache}", *extra])


def _losses(run: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if "loss" in r}


def _job_losses(results: list, run: str, key: str = "loss") -> dict[int, float]:
    """Rank 0's per-step ``key`` of ``run`` in the job."""
    return {r["step"]: r[key] for r in results[0]["runs"][run]}


def _max_rel(a: dict[int, float], b: dict[int, float]) -> float:
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
    from moe.parallel.deepspeed import DeepSpeedEngine

    recipe = _recipe(cache, "parallel.expert_parallel_size=2", "train.micro_batch_size=2")
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
    from moe.parallel.deepspeed import DeepSpeedEngine

    recipe = _recipe(cache, "parallel.expert_parallel_size=2", "train.micro_batch_size=2",
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
    path.parent.mkdir(parents=True, exist_ok=True)
    if container == "legacy":
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path)


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

    import moe.parallel.deepspeed as pd
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
    from moe.train import train

    real_forward, calls = MoEModel.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):
        result = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2 and self.training:
            result.loss = result.loss * float("nan")
        return result

    MoEModel.forward = poisoned
    try:
        train(_recipe(cache, "parallel.expert_parallel_size=2", "train.micro_batch_size=2", "train.steps=3"), out,
              progress=False)
    finally:
        MoEModel.forward = real_forward
    return _records(out)


def _records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "skipped_steps")} for r in records if "loss" in r]


def resume_leg(rank: int, world_size: int, src: str, dst: str, step: int, cache: str, overrides: list[str]) -> list:
    """Resume ``src``'s step-``step`` checkpoint (copied to ``dst``) on this job's ranks with ``overrides``."""
    from moe.train import train

    _crash_copy(rank, Path(src), Path(dst), step)
    train(_recipe(Path(cache), *MOVED, *overrides), Path(dst), resume=True, progress=False)
    return _records(Path(dst))


# The run that moves between layouts: 6 steps, a checkpoint after each, a global batch of 4 sequences.
MOVED = ["model.moe.router.aux_loss_coef=0", "train.steps=6", "train.save_every=1", "train.keep_checkpoints=6"]


def deepspeed_checks(rank: int, world_size: int, root: str, cache: str) -> dict:
    from moe.train import train

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
        train(_recipe(cache_p, *ep, f"parallel.zero_stage={stage}", "train.save_every=2"), run, progress=False)
        out["runs"][f"zero{stage}"] = _records(run)
        lap(f"zero{stage}")
        if stage in (0, 2):  # exact resume from the step-2 checkpoint
            resumed = root_p / f"zero{stage}_resumed"
            _crash_copy(rank, run, resumed, 2)
            train(_recipe(cache_p, *ep, f"parallel.zero_stage={stage}", "train.save_every=2"), resumed,
                  resume=True, progress=False)
            out["runs"][f"zero{stage}_resumed"] = _records(resumed)
            lap(f"zero{stage}_resumed")
            out["skip"][stage] = _skip_and_step(rank, cache_p, stage, run, root_p / f"engine{stage}")
            lap(f"skip{stage}")
    out["runs"]["poisoned"] = _poisoned_run(rank, cache_p, root_p / "poisoned")
    lap("poisoned")
    train(_recipe(cache_p, *MOVED, *ep), root_p / "moved_full", progress=False)
    out["runs"]["moved_full"] = _records(root_p / "moved_full")
    lap("moved_full")
    for name, extra in {"zero3": [*ep, "parallel.zero_stage=3"],
                        "ep3_on_2_ranks": ["model.moe.num_experts=6", "parallel.expert_parallel_size=3"]}.items():
        try:
            train(_recipe(cache_p, *extra), root_p / name, progress=False)
        except ValueError as e:
            out["errors"][name] = str(e)
    # ZeRO 2's optimizer partitions at another expert-parallel size: refused, nothing loaded.
    _crash_copy(rank, root_p / "zero2", root_p / "zero2_ep1", 2)
    try:
        train(_recipe(cache_p, "parallel.zero_stage=2", "train.micro_batch_size=2", "train.save_every=2"),
              root_p / "zero2_ep1", resume=True, progress=False)
    except ValueError as e:
        out["errors"]["zero2_reshard"] = str(e)
    lap("errors")
    if rank == 0:
        out["globals"] = _pickled_globals([root_p / f"zero{stage}" for stage in (0, 1, 2)])
    lap("globals")
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ds_data") / "cache"


@pytest.fixture(scope="module")
def job(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("ds_runs")
    start = time.perf_counter()
    res = run_distributed("tests.parallel.test_deepspeed:deepspeed_checks", 2, root, timeout=240,
                          root=str(root), cache=str(cache))
    print(f"2-rank DeepSpeed job: {time.perf_counter() - start:.1f} s; inside, per phase: {res[0]['seconds']}; "
          f"of skip0/skip2, forged checkpoints and failing saves: "
          f"{[res[0]['skip'][s]['seconds_forged_and_faults'] for s in ('0', '2')]}")
    return res, root


@pytest.fixture(scope="module")
def results(job):
    return job[0]


def test_exactly_the_expert_weights_carry_deepspeeds_marks(results):
    X = 2  # 4 experts over 2 ranks
    want = [[f"layers.{i}.mlp.experts.{w}", "ep_size_2", shape]
            for i in range(2) for w, shape in (("w_gate_up_ED2F", [X, 32, 32]), ("w_down_EFD", [X, 16, 32]))]
    for tags in (res["tags"] for res in results):
        assert tags["expert"] == want
        assert tags["dense_marked"] == []
        assert tags["has_moe_layers"] and tags["num_experts"] == [4, 4]
        # the optimizer's MoE groups (DeepSpeed's split) hold exactly the expert weights, named by their group
        assert [g[0] for g in tags["moe_groups"]] == ["ep_size_2"]
        assert tags["moe_groups"][0][1] == sorted(w[0] for w in want)
        assert tags["dense_groups_with_experts"] == 0


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_train_with_moe_layers(results, stage):
    losses = _job_losses(results, f"zero{stage}")
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(v == v and 0 < v < 10 for v in losses.values())  # finite
    assert losses[4] < losses[1]
    if stage:
        rel = _max_rel(losses, _job_losses(results, "zero0"))
        print(f"ZeRO {stage} vs ZeRO 0: max rel loss diff {rel:.1e}")
        assert rel < 1e-4


def test_zero3_and_bad_expert_parallel_sizes_are_refused_in_one_line(results):
    for res in results:
        errors = res["errors"]
        assert errors["zero3"].startswith("ZeRO stage 3 is not supported") and "\n" not in errors["zero3"]
        assert errors["ep3_on_2_ranks"].startswith("world size 2 is not divisible by ep_size 3")
        assert "re-sharding is implemented for ZeRO stage 0" in errors["zero2_reshard"]


def test_deepspeed_config_from_the_recipe_and_the_users_json(tmp_path):
    from moe.parallel.deepspeed import load_config

    recipe = _recipe(tmp_path, "train.micro_batch_size=3", "train.grad_accum_steps=2", "train.grad_clip=0.5",
                     "parallel.zero_stage=2")
    config = load_config(recipe, 4, cuda=False)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (3, 2, 24, 0.5)
    assert config["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True,
                                           "overlap_comm": False}
    assert config["bf16"] == {"enabled": False} and load_config(recipe, 4, cuda=True)["bf16"] == {"enabled": True}
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"allgather_bucket_size": 1000}, "gradient_clipping": 2.0}))
    merged = load_config(_recipe(tmp_path, f"parallel.deepspeed_config={user}", "parallel.zero_stage=1"), 2, cuda=False)
    assert merged["zero_optimization"]["allgather_bucket_size"] == 1000 and merged["zero_optimization"]["stage"] == 1
    assert merged["gradient_clipping"] == 2.0
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 64}))
    with pytest.raises(ValueError, match="'train_micro_batch_size_per_gpu' comes from the recipe; set "
                                         "train.micro_batch_size instead"):
        load_config(_recipe(tmp_path, f"parallel.deepspeed_config={user}"), 2, cuda=False)


def test_expert_parallel_size_without_processes_is_refused():
    from moe.engine import build_engine
    from moe.model import MoEModel

    recipe = _recipe(Path("unused"), "parallel.expert_parallel_size=2")
    with pytest.raises(ValueError, match="expert_parallel_size=2 needs that many processes: deepspeed --num_gpus 2"):
        build_engine(MoEModel(recipe.model), recipe)


@pytest.mark.parametrize("stage", [0, 2])
def test_a_skip_asked_by_one_rank_skips_the_step_on_every_rank(results, stage):
    skip = [res["skip"][str(stage)]["skip"] for res in results]
    step = [res["skip"][str(stage)]["step"] for res in results]
    assert [s[1:] for s in skip] == [[False, False]] * 2  # neither rank stepped, no weight moved
    assert [s[1:] for s in step] == [[True, True]] * 2
    assert skip[0][0] == pytest.approx(skip[1][0], rel=1e-6) and step[0][0] == pytest.approx(step[1][0], rel=1e-6)


def test_a_nonfinite_loss_on_one_rank_skips_the_step_everywhere(results):
    records = results[0]["runs"]["poisoned"]  # rank 0's own losses were all finite
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_from_a_deepspeed_checkpoint_is_bit_identical(results, stage):
    full, resumed = _job_losses(results, f"zero{stage}"), _job_losses(results, f"zero{stage}_resumed")
    assert sorted(resumed) == [1, 2, 3, 4]  # steps 1-2 kept from before the crash, 3-4 trained again
    assert resumed == full


@pytest.mark.parametrize("stage", [0, 2])
def test_a_forged_deepspeed_checkpoint_is_refused_and_runs_nothing(job, stage):
    """A pickle that would create a file, planted in a DeepSpeed checkpoint with a manifest rewritten to match:
    every rank refuses to resume, naming the file and the global, and nothing is unpickled. (The genuine
    checkpoints resume through the same check: the bit-identical and re-sharding resume tests.)"""
    results, root = job
    for case, (name, container) in PLANTED[stage].items():
        path = root / f"engine{stage}" / "forged" / case / "checkpoints" / "step_00000002" / name
        seen = [res["skip"][str(stage)]["planted"][case] for res in results]
        assert seen[0]["probe_ran"], case  # the payload is live: torch.load(weights_only=False) runs it
        assert not any(s["ran"] for s in seen), case
        error = seen[0]["error"]
        assert all(s["error"] == error for s in seen)  # every rank refuses alike
        why = ("it cannot be inspected without running it (" if container == "legacy" else
               "it refers to the Python global io.open, which DeepSpeed's checkpoint files do not use")
        assert error.startswith(f"{path} cannot be loaded safely: {why}"), error
        assert "\n" not in error


def test_a_failed_deepspeed_save_on_one_rank_keeps_the_previous_checkpoint(job):
    """ENOSPC in DeepSpeed's writer on rank 1 (the other rank writes on, into DeepSpeed's final barrier), then
    EACCES on rank 0's RNG file: the same one-line error on both ranks, the partial folder gone, ``latest`` and
    step 2 intact and resumable, no rank left waiting (the job would time out)."""
    results, root = job
    ckpts = root / "engine0" / "faults" / "checkpoints"
    faults = [res["skip"]["0"]["save_faults"] for res in results]
    assert faults[0]["errors"] == faults[1]["errors"]
    previous = f"; the previous checkpoint {ckpts / 'step_00000002'} is intact"
    full, denied = faults[0]["errors"]["3"], faults[0]["errors"]["4"]
    assert full.startswith(f"could not write checkpoint {ckpts / 'step_00000003'}: No space left on device "
                           f"(ENOSPC, {ckpts / 'step_00000003'}/"), full
    assert full.endswith(f" on rank 1{previous}") and "\n" not in full
    assert denied == (f"could not write checkpoint {ckpts / 'step_00000004'}: Permission denied (EACCES, "
                      f"{ckpts / 'step_00000004' / 'rng_rank00000.safetensors'}) on rank 0{previous}")
    for f in faults:
        assert f["listing"] == {"3": ["latest", "step_00000002"], "4": ["latest", "step_00000002"]}
        assert f["latest"] == "step_00000002" and f["resumed_at"] == 2
        assert f["writer_restored"] == "TorchCheckpointEngine"


def test_the_pickle_allow_list_is_exactly_what_deepspeeds_files_hold(results):
    """The globals outside torch's weights-only set in every file of the ZeRO 0/1/2 runs' checkpoints."""
    from moe.parallel.deepspeed import DEEPSPEED_PICKLE_GLOBALS

    found = results[0]["globals"]
    print(f"globals beyond torch's weights-only set, per file kind: {found}")
    assert {"mp_rank_N_model_states.pt", "layer_N_expert_N_mp_rank_N_model_states.pt",
            "expp_rank_N_mp_rank_N_optim_states.pt"} <= set(found["zero0"])
    for run, kinds in found.items():
        for kind, names in kinds.items():
            zero_partition = run != "zero0" and kind == "zero_pp_rank_N_mp_rank_N_optim_states.pt"
            assert names == (sorted(DEEPSPEED_PICKLE_GLOBALS) if zero_partition else []), (run, kind)
        assert run == "zero0" or "zero_pp_rank_N_mp_rank_N_optim_states.pt" in kinds


def test_two_ranks_equal_one_process_accumulating_their_micro_batches(results, cache, tmp_path):
    """With the load-balancing loss on: rank r's micro-batch is micro-batch r of one process (see the top)."""
    from moe.train import train

    one = tmp_path / "one"
    train(_recipe(cache, "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.save_every=2"), one,
          progress=False)
    rel = _max_rel(_job_losses(results, "zero0"), _losses(one))
    rel_norm = _max_rel(_job_losses(results, "zero0", "grad_norm"), _losses(one, "grad_norm"))
    print(f"2 ranks vs 1 process accumulating 2 micro-batches: max rel diff: loss {rel:.1e}, grad norm "
          f"{rel_norm:.1e}")
    assert rel < 1e-5
    assert rel_norm < 1e-5  # the clipping norm is the global one (expert shards of both ranks included)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_launcher_reproduces_one_process(cache, tmp_path):
    """THE end-to-end check: ``deepspeed --num_gpus 2 --module moe.train`` (expert parallel 2, B=2 per rank)
    logs the losses of ``moe.train`` on one process with B=4."""
    from moe.train import train

    extra = ["model.moe.router.aux_loss_coef=0"]
    one = tmp_path / "one"
    train(_recipe(cache, *extra, "train.micro_batch_size=4"), one, progress=False)

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
    rel = _max_rel(_losses(run), _losses(one))
    print(f"2 ranks (EP 2) vs 1 process, same global batch: max rel loss diff {rel:.1e}")
    assert rel <= 1e-5
    weights = load_file(run / "model.safetensors")
    assert weights["layers.0.mlp.experts.w_gate_up_ED2F"].shape == (4, 32, 32)  # gathered from both ranks
    # one process without DeepSpeed cannot read DeepSpeed's checkpoint, and says how to
    with pytest.raises(ValueError, match="was written by DeepSpeed: resume it with DeepSpeed"):
        train(_recipe(cache, *extra, "train.micro_batch_size=4"), run, resume=True, progress=False)


def test_resume_at_other_expert_parallel_sizes_2_then_4_then_1(job, cache, tmp_path):
    """Experts and AdamW state re-sharded from per-expert files: 2 ranks (EP 2) until step 4, 4 ranks (EP 4)
    for step 5, one process (EP 1) for step 6."""
    results, root = job
    start = time.perf_counter()
    four = run_distributed("tests.parallel.test_deepspeed:resume_leg", 4, tmp_path, timeout=120,
                           src=str(root / "moved_full"), dst=str(tmp_path / "four"), step=4, cache=str(cache),
                           overrides=["parallel.expert_parallel_size=4", "train.micro_batch_size=1"])
    one_process_deepspeed = tmp_path / "ds.json"  # a DeepSpeed config: DeepSpeed even on one process
    one_process_deepspeed.write_text("{}")
    one = run_distributed("tests.parallel.test_deepspeed:resume_leg", 1, tmp_path, timeout=120,
                          src=str(tmp_path / "four"), dst=str(tmp_path / "one"), step=5, cache=str(cache),
                          overrides=["train.micro_batch_size=4", f"parallel.deepspeed_config={one_process_deepspeed}"])
    print(f"resume legs on 4 ranks and 1 process: {time.perf_counter() - start:.1f} s")
    full = _job_losses(results, "moved_full")
    moved = {r["step"]: r["loss"] for r in one[0]}
    assert [r["step"] for r in four[0]] == [1, 2, 3, 4, 5, 6] and sorted(moved) == [1, 2, 3, 4, 5, 6]
    assert moved[5] == four[0][4]["loss"]  # step 5 on 4 ranks, step 6 on one process
    rel = _max_rel(moved, full)
    print(f"moved 2 -> 4 -> 1 vs never moved: max rel loss diff {rel:.1e}")
    assert rel <= 1e-5



def test_bf16_at_zero_stage_0_starts_and_trains(tmp_path):
    """DeepSpeed's bf16 optimizer wrapper steps once inside deepspeed.initialize (to create its states); our
    step veto must exist by then and veto it. One process, DeepSpeed and bf16 chosen by a user config."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"bf16": {"enabled": True}}))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moe", "train", "recipes/tiny.yaml", "--out", str(out), "--max-steps", "2",
           "--no-progress", *SMALL, f"data.cache_dir={tmp_path / 'cache'}", "train.dtype=bfloat16",
           f"parallel.deepspeed_config={config}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = _losses(out)
    assert sorted(losses) == [1, 2] and all(v == v for v in losses.values())
