"""Optimizer parameter groups of a model, shared by the one-process engine and DeepSpeed's."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms and other 1-D parameters (nanoGPT convention); matrices and expert tensors decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
