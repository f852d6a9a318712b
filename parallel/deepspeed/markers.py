"""How our model looks to DeepSpeed: one ``MoEMarker`` per MoE layer inside a ``DeepSpeedModule``.

DeepSpeed switches its MoE handling on (expert gradient reduction over the expert-data-parallel group, the
per-expert checkpoint layout) only when the model holds ``deepspeed.moe.layer.MoE`` modules
(``runtime/engine.py``). The markers are such modules, never called: they carry the attributes DeepSpeed reads
and present each layer's local experts under the key pattern DeepSpeed's checkpointing splits into one file per
MoE layer and global expert (``layer_{L}_expert_{e}_mp_rank_00_model_states.pt``), whatever the layout that
wrote them.

Shape legend: E experts, P ranks per expert-parallel group, X = E/P experts per rank.
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from moe.experts import Experts
from moe.parallel.expert_parallel import expert_group_name, is_expert_param

EXPERT_WEIGHTS = ("w_gate_up_ED2F", "w_down_EFD")
# The key pattern DeepSpeed's MoE checkpointing splits into per-expert files (runtime/engine.py).
DS_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts"


class MoEMarker(MoE):
    """Stands for one of our MoE layers where DeepSpeed looks for ``deepspeed.moe.layer.MoE`` modules.

    DeepSpeed enables its MoE handling (expert gradient reduction, MoE checkpoint layout) only when the model
    contains such a module. This one is never called; it carries the attributes DeepSpeed reads
    (``num_experts``, ``num_local_experts``, ``ep_size``, ``expert_group_name``) and presents the layer's local
    experts, one entry per expert, under the key pattern DeepSpeed's checkpointing splits into per-expert
    files. ``MoE.__init__`` (which would build DeepSpeed's own gate and experts) is skipped on purpose.
    """

    def __init__(self, experts: Experts, num_experts: int, ep_size: int) -> None:
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)
        self._experts = (experts,)  # a tuple, so that the experts are not registered a second time

    @property
    def experts(self) -> Experts:
        return self._experts[0]

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, **_: Any) -> None:
        # The groups exist already (DeepSpeedEngine creates them); only their layout must be ours.
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel is not supported: the expert-parallel groups "
                             "are consecutive ranks (parallel/groups.py)")

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("MoEMarker is a marker for DeepSpeed; the model's MoELayer does the work")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name in EXPERT_WEIGHTS:
            w = getattr(self.experts, name)
            w = w if keep_vars else w.detach()
            for j in range(w.shape[0]):  # local expert j; DeepSpeed renames it to the global index
                destination[f"{prefix}{DS_EXPERT_PREFIX}.{j}.{name}"] = w[j]


class DeepSpeedModule(nn.Module):
    """What DeepSpeed wraps: the model (``.model``) and one marker per MoE layer (``.moe``).

    Its state dict leaves the expert weights out of the ``model.`` keys: the markers carry them, one entry per
    expert, so that DeepSpeed writes them to per-expert files and not (rank 0's shard only) to the main file.
    """

    def __init__(self, model: nn.Module, markers: list[MoEMarker]) -> None:
        super().__init__()
        self.model = model
        self.moe = nn.ModuleList(markers)
        self.expert_names = [n for n, p in model.named_parameters() if is_expert_param(p)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name in self.expert_names:
            state.pop(f"{prefix}model.{name}", None)
        return state

    def load_checkpoint_state(self, src: dict[str, torch.Tensor], dst: nn.Module | None = None) -> None:
        """DeepSpeed's ``custom_load_fn``: ``src`` holds the ``model.`` keys and, under each marker, this rank's
        experts (DeepSpeed has already picked the per-expert files of this rank's global experts)."""
        src = dict(src)
        with torch.no_grad():
            for i, marker in enumerate(self.moe):
                for name in EXPERT_WEIGHTS:
                    w = getattr(marker.experts, name)
                    keys = [f"moe.{i}.{DS_EXPERT_PREFIX}.{j}.{name}" for j in range(w.shape[0])]
                    missing = [k for k in keys if k not in src]
                    if missing:
                        raise ValueError(f"checkpoint: expert weights missing for MoE layer {i}: {missing[:2]}")
                    w.copy_(torch.stack([src.pop(k) for k in keys]))
        prefix = "model."
        rest = {k[len(prefix):]: v for k, v in src.items() if k.startswith(prefix)}
        stray = [k for k in src if not k.startswith(prefix)]
        missing, unexpected = self.model.load_state_dict(rest, strict=False)
        missing = [m for m in missing if m not in self.expert_names]
        if missing or unexpected or stray:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected "
                             f"{(unexpected + stray)[:3]}")
