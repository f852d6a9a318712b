"""The seam between the training loop and what runs the optimizer: one process here, DeepSpeed in
``moe.parallel.deepspeed.engine``. Both offer the same small interface, so ``moe.trainer`` does not know which it has;
``build_engine`` picks one.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Protocol

import torch

from moe.checkpoint import (DEEPSPEED_MODEL_FILE, load_checkpoint, model_state, resume_checkpoint, save_checkpoint,
                            written_by_deepspeed)
from moe.config import Recipe
from moe.optim import param_groups

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the training loop needs from the optimizer side.

    Attributes:
        model: the module to call for forward passes.
        rank, world_size: this process's data-parallel position (0 and 1 on one process). Every rank reads
            its own data, also under expert parallelism.
        device: where this rank's model lives; inputs go there.
    """

    model: torch.nn.Module
    rank: int
    world_size: int
    device: torch.device

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float, skip: bool = False) -> tuple[float, bool]:
        """Clip, and take the optimizer step unless ``skip`` or the gradient norm is not finite (the norm
        is global, so every rank decides alike); zero the gradients. Returns (norm, whether it stepped)."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over all ranks (a new tensor on ``t``'s device)."""

    def barrier(self) -> None: ...

    def model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights (experts gathered from every rank) on rank 0, None on the others.
        Every rank must call it."""

    def save(self, root: Path, step: int, keep: int) -> None:
        """Every rank calls it; the checkpoint is complete when ``root / "latest"`` names it."""

    def resume(self, root: Path) -> int:
        """Load the newest intact checkpoint under ``root``; returns its step (0 when there is none)."""


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a device: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def build_engine(model: torch.nn.Module, recipe: Recipe, *, resume_from: Path | None = None) -> Engine:
    """``DeepSpeedEngine`` when launched on several processes (``WORLD_SIZE`` > 1, or a process group of several
    ranks already made), when the recipe asks for DeepSpeed (``parallel.zero_stage`` > 0 or a
    ``parallel.deepspeed_config``), or when the checkpoint a resume from ``resume_from`` (a run's
    ``checkpoints`` folder) would load was written by DeepSpeed: then DeepSpeed runs on one process too, and
    re-shards a ZeRO-0 checkpoint of any layout (``moe.parallel.deepspeed.checkpoint``). ``LocalEngine``
    otherwise. ``model`` is the full model on the CPU; it is moved to the engine's device (and, under expert
    parallelism, sharded) here."""
    from moe.parallel.groups import launched_world_size

    p = recipe.parallel
    asked = launched_world_size() > 1 or p.zero_stage > 0 or p.deepspeed_config is not None
    if asked or (resume_from is not None and written_by_deepspeed(resume_from)):
        from moe.parallel.deepspeed.engine import DeepSpeedEngine

        if not asked:
            log.info("resuming a DeepSpeed checkpoint from %s: DeepSpeed on this one process", resume_from)
        return DeepSpeedEngine(model, recipe)
    if p.expert_parallel_size > 1:
        raise ValueError(f"parallel.expert_parallel_size={p.expert_parallel_size} needs that many processes: "
                         f"deepspeed --num_gpus {p.expert_parallel_size} --module moe.train RECIPE ...")
    return LocalEngine(model, recipe)


class LocalEngine:
    """One process: AdamW, gradient clipping, checkpoints from ``moe.checkpoint``."""

    rank = 0
    world_size = 1

    def __init__(self, model: torch.nn.Module, recipe: Recipe) -> None:
        t = recipe.train
        self.device = resolve_device(t.device)
        self.model = model.to(self.device)
        self.grad_clip = t.grad_clip
        self.optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, skip: bool = False) -> tuple[float, bool]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        stepped = math.isfinite(norm) and not skip
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def model_state(self) -> dict[str, torch.Tensor]:
        return model_state(self.model)

    def save(self, root: Path, step: int, keep: int) -> None:
        save_checkpoint(root, step, self.model, self.optimizer, keep)

    def resume(self, root: Path) -> int:
        path = resume_checkpoint(root)
        if path is not None and (path / DEEPSPEED_MODEL_FILE).is_file():
            # build_engine(..., resume_from=root) picks DeepSpeed for a DeepSpeed checkpoint; this one was not
            # the first candidate (``latest`` names a one-process checkpoint that is damaged).
            raise ValueError(f"checkpoint {path}, the newest intact one, was written by DeepSpeed, and the newer "
                             f"ones under {root} are damaged: move those away, then `moe train RECIPE --out "
                             f"{root.parent} --resume` resumes it (with DeepSpeed, on one process)")
        return 0 if path is None else load_checkpoint(path, self.model, self.optimizer)
