"""The seam between the training loop and what runs the optimizer: one process here, DeepSpeed in
``parallel/deepspeed.py``. Both offer the same small interface, so ``moe.train`` does not know which it has.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch

from moe.checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint
from moe.config import Recipe


class Engine(Protocol):
    """What the training loop needs from the optimizer side.

    Attributes:
        model: the module to call for forward passes.
        rank, world_size: this process's data-parallel position (0 and 1 on one process).
    """

    model: torch.nn.Module
    rank: int
    world_size: int

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float, skip: bool = False) -> tuple[float, bool]:
        """Clip, and take the optimizer step unless ``skip`` or the gradient norm is not finite (the norm
        is global, so every rank decides alike); zero the gradients. Returns (norm, whether it stepped)."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def save(self, root: Path, step: int, keep: int) -> None: ...

    def resume(self, root: Path) -> int:
        """Load the newest intact checkpoint under ``root``; returns its step (0 when there is none)."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms and other 1-D parameters (nanoGPT convention); matrices and expert tensors decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class LocalEngine:
    """One process: AdamW, gradient clipping, checkpoints from ``moe.checkpoint``."""

    rank = 0
    world_size = 1

    def __init__(self, model: torch.nn.Module, recipe: Recipe) -> None:
        t = recipe.train
        self.model = model
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

    def save(self, root: Path, step: int, keep: int) -> None:
        save_checkpoint(root, step, self.model, self.optimizer, keep)

    def resume(self, root: Path) -> int:
        path = resume_checkpoint(root)
        return 0 if path is None else load_checkpoint(path, self.model, self.optimizer)
