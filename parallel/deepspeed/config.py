"""The DeepSpeed config of a run: generated from the recipe, with the user's JSON (``parallel.deepspeed_config``)
merged over it, and validated.

The recipe owns batch sizes, the optimizer and the schedule (the trainer builds AdamW and sets the learning
rate; gradient accumulation is the trainer's, so DeepSpeed runs with ``managed_gradient_accumulation: false``);
the user's JSON may set anything else (ZeRO details, communication settings) but not those keys.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from moe.config import Recipe, uses_bf16

# Keys of the user's DeepSpeed JSON that the trainer owns (they come from the recipe).
_RECIPE_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "train_batch_size": "train.micro_batch_size × train.grad_accum_steps × world size",
    "optimizer": "train.lr, train.beta1, train.beta2, train.weight_decay (the trainer builds AdamW)",
    "scheduler": "train.lr, train.warmup_steps, train.min_lr_ratio (the trainer sets the learning rate)",
    "managed_gradient_accumulation": "nothing: the trainer accumulates gradients itself",
}



def ds_config_from_recipe(recipe: Recipe, world_size: int, *, cuda: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config of ``recipe`` on ``world_size`` ranks (before the user's JSON is merged over it).

    Args:
        recipe: the run's recipe (``train`` and ``parallel`` sections).
        world_size: W.
        cuda: whether the run is on CUDA (None: ``torch.cuda.is_available()``); bf16 only there.
    """
    t, p = recipe.train, recipe.parallel
    cuda = torch.cuda.is_available() if cuda is None else cuda
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage in (1, 2):
        # DeepSpeed's MoE support in ZeRO 1/2 asserts both (runtime/zero/stage_1_and_2.py _configure_moe_settings).
        zero.update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=False)
    return {
        # Our optimizer is torch's AdamW with a veto in front of its step (_VetoableAdamW); ZeRO checks the
        # exact type against its list, and a subclass is not on it.
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # DeepSpeed's bf16 mode (bf16 weights, fp32 master copies) on CUDA only; on a CPU a bf16 recipe runs
        # fp32 weights under the trainer's bf16 autocast, as on one process.
        "bf16": {"enabled": cuda and t.device != "cpu" and uses_bf16(t, "cuda")},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def merge_config(base: dict[str, Any], user: dict[str, Any], path: str = "") -> dict[str, Any]:
    """``user`` over ``base``, nested dicts merged key by key. Raises ValueError on a key the recipe owns."""
    out = copy.deepcopy(base)
    for key, value in user.items():
        if not path and key in _RECIPE_OWNED and (key not in base or value != base[key]):
            raise ValueError(f"parallel.deepspeed_config: {key!r} comes from the recipe; set "
                             f"{_RECIPE_OWNED[key]} instead")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value, f"{path}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(recipe: Recipe, world_size: int, *, cuda: bool | None = None) -> dict[str, Any]:
    """The generated config with ``parallel.deepspeed_config`` merged over it, validated."""
    config = ds_config_from_recipe(recipe, world_size, cuda=cuda)
    path = recipe.parallel.deepspeed_config
    if path is not None:
        try:
            user = json.loads(Path(path).expanduser().read_text())
        except FileNotFoundError:
            raise ValueError(f"parallel.deepspeed_config: {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"parallel.deepspeed_config: {path} is not valid JSON ({e})") from None
        if not isinstance(user, dict):
            raise ValueError(f"parallel.deepspeed_config: {path} must hold a JSON object")
        config = merge_config(config, user)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if config.get("checkpoint", {}).get("checkpoint_serialization", True) is False:
        raise ValueError("parallel.deepspeed_config: checkpoint.checkpoint_serialization=false writes legacy "
                         "pickles, which cannot be inspected before --resume loads them; remove it")
    if config.get("fp16", {}).get("enabled", False):
        raise ValueError("parallel.deepspeed_config: fp16 is not supported; bf16 is used on CUDA (train.dtype)")
    return config
