"""DeepSpeed checkpoints of a ``DeepSpeedEngine``: save, resume, and re-shard at ZeRO 0.

Checkpoints (``save`` / ``resume``): ``engine.save_checkpoint`` writes ``OUT/checkpoints/step_XXXXXXXX/``:
``mp_rank_00_model_states.pt`` (the non-expert weights), ``layer_{L}_expert_{e}_mp_rank_00_model_states.pt``
(one file per MoE layer and global expert, whatever P was), ``expp_rank_{r}_mp_rank_00_optim_states.pt``
(stage 0) or ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` (ZeRO 1/2); we add ``rng_rank{r}.safetensors``,
``state.json`` (step and layout) and ``manifest.json`` (SHA-256 of every file), and DeepSpeed's ``latest``
marker is written last, atomically. Resume on the same layout is bit-exact. At ZeRO 0 (fp32) a checkpoint
also resumes at another P or W: DeepSpeed reads the per-expert files of this rank's experts, and AdamW's state
is re-sharded from every ``expp_rank`` file (``_resharded_optimizer_state``); ZeRO 1/2 partitions are not
re-sharded (refused).

``save`` fails cleanly: a write that fails on any rank (disk full, no permission) raises the same one-line
``RuntimeError`` on every rank, after the partial step folder is removed; ``latest`` and the checkpoint it
names are untouched. The ranks agree after each phase of the save (``_agree``) and DeepSpeed's writes are
deferred on failure (``_DeferredWriteErrors``), so no rank is left waiting in a collective that a failed rank
skipped.

The folder names, the ``latest`` marker, pruning, RNG state and the failure messages are ``moe.checkpoint``'s
primitives, shared with the one-process checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from moe.checkpoint import (intact_note, prune, publish_latest, restore_rng, resume_checkpoint, rng_state,
                            step_dir_name, write_manifest)
from moe.parallel.deepspeed.pickle_guard import check_pickled_files, first_line

log = logging.getLogger(__name__)


class CheckpointedEngine(Protocol):
    """What saving and resuming read of ``DeepSpeedEngine``."""

    ds: Any  # deepspeed's engine
    module: nn.Module  # the DeepSpeedModule it wraps
    optimizer: torch.optim.Optimizer
    device: torch.device
    rank: int
    world_size: int
    ep_size: int
    ep_group: Any
    num_experts: int
    zero_stage: int
    plain: bool  # ZeRO 0 in fp32: per-rank optimizer files, re-shardable


def layout(engine: CheckpointedEngine) -> dict[str, int]:
    """What a checkpoint records of the run that wrote it, and what a resume compares."""
    return {"ep_size": engine.ep_size, "world_size": engine.world_size, "zero_stage": engine.zero_stage,
            "num_experts": engine.num_experts}


def _write_failure(e: BaseException, path: str | None = None) -> str:
    """Why a write failed, for the one-line error: ``reason (ERRNO, path)`` for an OSError."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename or path
        return f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)}{', ' + str(where) if where else ''})"
    # torch.save reports a full disk as a RuntimeError of its zip writer ("unexpected pos ..."), without errno
    return f"{type(e).__name__}: {first_line(e)}{f' ({path})' if path else ''}"


def _attempt(write: Any) -> str | None:
    """Run ``write()``; why it failed (``_write_failure``), or None."""
    try:
        write()
    except Exception as e:
        return _write_failure(e)
    return None


class _DeferredWriteErrors:
    """Stands for DeepSpeed's checkpoint engine during ``save_checkpoint``: a write or folder creation that fails
    is recorded and this rank's later writes are skipped, instead of raising out of ``save_checkpoint``. A rank
    that left it early would skip its remaining collectives (its final barrier) and leave the others waiting
    there until the process-group timeout; the ranks agree on the outcome afterwards (``DeepSpeedEngine._agree``).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failure: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        if self.failure is None:
            try:
                self.inner.save(state_dict, path)
            except Exception as e:
                self.failure = _write_failure(e, path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        if self.failure is None:
            try:
                self.inner.makedirs(path, exist_ok=exist_ok)
            except Exception as e:
                self.failure = _write_failure(e, path)



def save(engine: CheckpointedEngine, root: Path, step: int, keep: int) -> None:
    """Every rank calls this. ``latest`` is replaced last, so a crash leaves the previous one in force.

    Raises:
        RuntimeError: on every rank alike, when a write failed on any rank (disk full, no permission): one
            line naming the step folder, the reason (errno and file for an OSError) and the rank. The partial
            step folder is removed first; ``latest`` and the checkpoint it names are untouched.
    """
    tag = step_dir_name(step)
    folder = root / tag

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # a partial save of a crashed run, or a rerun of this step after a resume
            shutil.rmtree(folder)

    _agree(engine, root, folder, _attempt(prepare) if engine.rank == 0 else None)  # before anyone writes there
    writer = _DeferredWriteErrors(engine.ds.checkpoint_engine)
    engine.ds.checkpoint_engine = writer
    try:
        engine.ds.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    finally:
        engine.ds.checkpoint_engine = writer.inner
    failure = writer.failure
    if failure is None:
        rng = rng_state(engine.device)
        failure = _attempt(lambda: save_file(rng, str(folder / f"rng_rank{engine.rank:05d}.safetensors")))
    _agree(engine, root, folder, failure)

    def finish() -> None:
        (folder / "state.json").write_text(json.dumps({"step": step, **layout(engine)}))
        write_manifest(folder)
        publish_latest(root, tag)  # DeepSpeed's marker too, written last

    _agree(engine, root, folder, _attempt(finish) if engine.rank == 0 else None)
    if engine.rank == 0:
        prune(root, keep)
    dist.barrier()



def _agree(engine: CheckpointedEngine, root: Path, folder: Path, failure: str | None) -> None:
    """Collective: every rank learns whether any rank's part of saving ``folder`` failed (``failure``: why,
    or None); if one did, the partial folder is removed and every rank raises the first rank's reason."""
    failures: list[str | None] = [None] * engine.world_size
    dist.all_gather_object(failures, failure)
    failed = [(r, why) for r, why in enumerate(failures) if why is not None]
    if not failed:
        return
    if engine.rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            (root / ".latest.tmp").unlink(missing_ok=True)
    dist.barrier()  # removed before any rank reports
    rank, why = failed[0]
    raise RuntimeError(f"could not write checkpoint {folder}: {why} on rank {rank}; {intact_note(root)}")



def resume(engine: CheckpointedEngine, root: Path) -> int:
    """Load the newest intact checkpoint under ``root`` (rank 0 verifies the manifest, the ranks share the
    inspection of the pickled files, every rank loads); its step.

    Raises:
        ValueError: on every rank alike: no intact checkpoint, a pickled file that could run code
            (``check_pickled_files``), or a layout that cannot be resumed.
    """
    choice: list[Any] = [None]
    if engine.rank == 0:
        try:
            path = resume_checkpoint(root) if root.is_dir() else None
            choice = [("ok", None if path is None else path.name)]
        except ValueError as e:
            choice = [("error", str(e))]
    dist.broadcast_object_list(choice, src=0)
    status, value = choice[0]
    if status == "error":
        raise ValueError(value)
    if value is None:
        return 0
    folder = root / value
    # Before anything of it is unpickled: every rank inspects its share of the files, all agree.
    try:
        check_pickled_files(folder, shard=(engine.rank, engine.world_size))
        refusal = None
    except ValueError as e:
        refusal = str(e)
    refusals: list[str | None] = [None] * engine.world_size
    dist.all_gather_object(refusals, refusal)
    refused = sorted(r for r in refusals if r is not None)
    if refused:
        raise ValueError(refused[0])
    meta = json.loads((folder / "state.json").read_text())
    if "ep_size" not in meta:
        raise ValueError(f"checkpoint {folder} was written by the one-process trainer (moe.checkpoint), not "
                         f"DeepSpeed, and is not re-sharded onto DeepSpeed: resume it on one process without "
                         f"DeepSpeed, `moe train RECIPE --out {root.parent} --resume` with parallel.zero_stage=0 "
                         "and no parallel.deepspeed_config")
    saved, now = {k: meta[k] for k in layout(engine)}, layout(engine)
    reshard = saved != now
    if reshard:
        _check_reshard(engine, folder, saved, now)
        log.warning("resuming %s, written with expert parallel %d on %d ranks, at expert parallel %d on %d "
                    "ranks: experts and optimizer state re-sharded%s", folder, saved["ep_size"],
                    saved["world_size"], now["ep_size"], now["world_size"],
                    "" if saved["world_size"] == now["world_size"] else
                    "; the global batch is the same only if micro_batch_size × ranks is")
    # DeepSpeed loads this rank's experts from the per-expert files, whatever the layout that wrote them.
    load_path, client = engine.ds.load_checkpoint(str(root), tag=value, load_optimizer_states=not reshard,
                                                custom_load_fn=engine.module.load_checkpoint_state)
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {folder}")
    if reshard:
        engine.optimizer.load_state_dict(_resharded_optimizer_state(engine, folder, saved["ep_size"]))
    rng_file = folder / f"rng_rank{engine.rank:05d}.safetensors"
    if rng_file.is_file():  # absent for the ranks a smaller run did not have
        restore_rng(load_file(str(rng_file)), engine.device)
    return int(client["step"])


def _check_reshard(engine: CheckpointedEngine, folder: Path, saved: dict[str, int], now: dict[str, int]) -> None:
    if saved["zero_stage"] != now["zero_stage"] or saved["num_experts"] != now["num_experts"]:
        raise ValueError(f"checkpoint {folder} was written with {saved}, this run has {now}: the ZeRO stage "
                         "and the number of experts must stay the same")
    if not engine.plain:
        raise ValueError(f"checkpoint {folder} was written with expert parallel {saved['ep_size']} on "
                         f"{saved['world_size']} ranks, this run has {now['ep_size']} on {now['world_size']}: "
                         "re-sharding is implemented for ZeRO stage 0 in fp32 (per-rank optimizer files), "
                         "not for ZeRO 1/2 partitions or bf16; resume with the old layout")


def _resharded_optimizer_state(engine: CheckpointedEngine, folder: Path, old_ep_size: int) -> dict[str, Any]:
    """AdamW's state for this rank's layout, from the per-expert-parallel-rank files of another layout.

    File k (``expp_rank_k_...``) holds the full state of a rank that owned experts ``[k·X_old, (k+1)·X_old)``:
    the expert tensors (exp_avg, exp_avg_sq: X_old experts along dim 0) are concatenated over k and this
    rank's X slice taken; everything else is replicated, identical in every file. Loaded with
    ``weights_only=True`` (plain tensors and numbers; the manifest has been verified).
    """
    files = []
    for k in range(old_ep_size):
        path = folder / f"expp_rank_{k}_mp_rank_00_optim_states.pt"
        files.append(torch.load(path, map_location="cpu", weights_only=True)["optimizer"])
    current = engine.optimizer.state_dict()
    old_groups, new_groups = files[0]["param_groups"], current["param_groups"]
    if [len(g["params"]) for g in old_groups] != [len(g["params"]) for g in new_groups]:
        raise ValueError(f"checkpoint {folder}: its optimizer parameter groups do not match this model's")
    expert_index = {i for g in new_groups if g.get("moe") for i in g["params"]}
    X, r = engine.num_experts // engine.ep_size, dist.get_rank(engine.ep_group)
    state = {}
    for i, entry in files[0]["state"].items():
        if i in expert_index:
            state[i] = {key: torch.cat([f["state"][i][key] for f in files])[r * X:(r + 1) * X].clone()
                        if value.dim() > 0 else value for key, value in entry.items()}
        else:
            state[i] = entry
    groups = [{**old, "name": new["name"], "params": new["params"]} for old, new in zip(old_groups, new_groups)]
    return {"state": state, "param_groups": groups}
