"""``moe.parallel.deepspeed.engine`` on 2 gloo ranks: DeepSpeed's expert marks, ZeRO 0/1/2, skipped steps agreed by
every rank, the exact global gradient norm, bf16 at ZeRO 0, and the start-up refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel.deepspeed.job import SMALL, job_losses, max_rel, run_losses, small_recipe
from tests.parallel.launcher import REPO_ROOT


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
    losses = job_losses(results, f"zero{stage}")
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(v == v and 0 < v < 10 for v in losses.values())  # finite
    assert losses[4] < losses[1]
    if stage:
        rel = max_rel(losses, job_losses(results, "zero0"))
        print(f"ZeRO {stage} vs ZeRO 0: max rel loss diff {rel:.1e}")
        assert rel < 1e-4


def test_zero3_and_bad_expert_parallel_sizes_are_refused_in_one_line(results):
    for res in results:
        errors = res["errors"]
        assert errors["zero3"].startswith("ZeRO stage 3 is not supported") and "\n" not in errors["zero3"]
        assert errors["ep3_on_2_ranks"].startswith("world size 2 is not divisible by ep_size 3")
        assert "re-sharding is implemented for ZeRO stage 0" in errors["zero2_reshard"]


def test_expert_parallel_size_without_processes_is_refused():
    from moe.engine import build_engine
    from moe.model import MoEModel

    recipe = small_recipe(Path("unused"), "parallel.expert_parallel_size=2")
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


def test_two_ranks_equal_one_process_accumulating_their_micro_batches(results, cache, tmp_path):
    """With the load-balancing loss on: rank r's micro-batch is micro-batch r of one process (see the top)."""
    from moe.trainer import train

    one = tmp_path / "one"
    train(small_recipe(cache, "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.save_every=2"), one,
          progress=False)
    rel = max_rel(job_losses(results, "zero0"), run_losses(one))
    rel_norm = max_rel(job_losses(results, "zero0", "grad_norm"), run_losses(one, "grad_norm"))
    print(f"2 ranks vs 1 process accumulating 2 micro-batches: max rel diff: loss {rel:.1e}, grad norm "
          f"{rel_norm:.1e}")
    assert rel < 1e-5
    assert rel_norm < 1e-5  # the clipping norm is the global one (expert shards of both ranks included)


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
    losses = run_losses(out)
    assert sorted(losses) == [1, 2] and all(v == v for v in losses.values())


@pytest.mark.parametrize("env, cores, expected", [
    ({"LOCAL_SIZE": "2"}, 2, 1),                              # DeepSpeed's launcher, 2 ranks on 2 cores
    ({"LOCAL_WORLD_SIZE": "4", "LOCAL_SIZE": "2"}, 16, 4),    # torchrun's name first
    ({"LOCAL_SIZE": "3"}, 2, 1),                              # never below one thread
    ({"LOCAL_SIZE": "1"}, 2, None),                           # one rank here: all the cores
    ({}, 2, None),                                            # no launcher
    ({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "2"}, 2, None),   # the user's choice stands
])
def test_each_rank_takes_its_share_of_the_cores(monkeypatch, env, cores, expected):
    """2 ranks × 2 OpenMP threads on 2 cores spin in each other's way: 6× slower at ZeRO 0 (docs/benchmarks.md)."""
    import torch

    from moe.parallel.deepspeed.engine import share_cores

    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(16)  # as many as torch would start on a 16-core machine
        assert share_cores() == expected
        assert torch.get_num_threads() == (16 if expected is None else expected)
    finally:
        torch.set_num_threads(before)
