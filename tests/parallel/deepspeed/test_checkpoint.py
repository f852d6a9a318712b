"""``moe.parallel.deepspeed.checkpoint`` and ``pickle_guard``: bit-identical resume, re-sharding across expert-parallel
sizes at ZeRO 0, failed saves, forged checkpoints refused without running them, the pickle allow-list."""

from __future__ import annotations

import time

import pytest

from tests.parallel.deepspeed.job import PLANTED, job_losses, max_rel
from tests.parallel.launcher import run_distributed


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_from_a_deepspeed_checkpoint_is_bit_identical(results, stage):
    full, resumed = job_losses(results, f"zero{stage}"), job_losses(results, f"zero{stage}_resumed")
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
    from moe.parallel.deepspeed.pickle_guard import DEEPSPEED_PICKLE_GLOBALS

    found = results[0]["globals"]
    print(f"globals beyond torch's weights-only set, per file kind: {found}")
    assert {"mp_rank_N_model_states.pt", "layer_N_expert_N_mp_rank_N_model_states.pt",
            "expp_rank_N_mp_rank_N_optim_states.pt"} <= set(found["zero0"])
    for run, kinds in found.items():
        for kind, names in kinds.items():
            zero_partition = run != "zero0" and kind == "zero_pp_rank_N_mp_rank_N_optim_states.pt"
            assert names == (sorted(DEEPSPEED_PICKLE_GLOBALS) if zero_partition else []), (run, kind)
        assert run == "zero0" or "zero_pp_rank_N_mp_rank_N_optim_states.pt" in kinds


def test_resume_at_other_expert_parallel_sizes_2_then_4_then_1(job, cache, tmp_path):
    """Experts and AdamW state re-sharded from per-expert files: 2 ranks (EP 2) until step 4, 4 ranks (EP 4)
    for step 5, one process (EP 1) for step 6."""
    results, root = job
    start = time.perf_counter()
    four = run_distributed("tests.parallel.deepspeed.job:resume_leg", 4, tmp_path, timeout=120,
                           src=str(root / "moved_full"), dst=str(tmp_path / "four"), step=4, cache=str(cache),
                           overrides=["parallel.expert_parallel_size=4", "train.micro_batch_size=1"])
    # One process, the recipe's defaults (ZeRO 0, no DeepSpeed config): the DeepSpeed checkpoint picks DeepSpeed.
    one = run_distributed("tests.parallel.deepspeed.job:resume_leg", 1, tmp_path, timeout=120,
                          src=str(tmp_path / "four"), dst=str(tmp_path / "one"), step=5, cache=str(cache),
                          overrides=["train.micro_batch_size=4"])
    print(f"resume legs on 4 ranks and 1 process: {time.perf_counter() - start:.1f} s")
    full = job_losses(results, "moved_full")
    moved = {r["step"]: r["loss"] for r in one[0]}
    assert [r["step"] for r in four[0]] == [1, 2, 3, 4, 5, 6] and sorted(moved) == [1, 2, 3, 4, 5, 6]
    assert moved[5] == four[0][4]["loss"]  # step 5 on 4 ranks, step 6 on one process
    rel = max_rel(moved, full)
    print(f"moved 2 -> 4 -> 1 vs never moved: max rel loss diff {rel:.1e}")
    assert rel <= 1e-5
