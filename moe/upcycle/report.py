"""The conversion report (docs/routers.md#upcycling-contract): per converted layer, the output scale folded into
the experts, whether the method is expected to reproduce the dense FFN exactly, and max |MoE − dense| on float64 probes.

Shape legend: D model width, T probe tokens.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe.config import MoEConfig
from moe.upcycle.options import CopyOptions, DropOptions, MethodOptions, NeuronSplitOptions


def exact_expected(opts: MethodOptions, moe_cfg: MoEConfig, scale: float) -> bool:
    """Whether the upcycled layer reproduces the dense FFN exactly at init (docs/routers.md#upcycling), for topk
    routers; False (make no claim) for other routers."""
    rc = moe_cfg.router
    if rc.name != "topk" or moe_cfg.capacity_factor is not None or moe_cfg.eval_capacity_factor is not None:
        return False
    E, k = moe_cfg.num_experts, rc.top_k
    if isinstance(opts, CopyOptions):
        return rc.renormalize and opts.noise_std == 0
    if isinstance(opts, DropOptions):
        return rc.renormalize and opts.ratio == 0
    if isinstance(opts, NeuronSplitOptions):  # all experts active with weights 1/E, and s = E
        return k == E and opts.router_init == "zero" and scale == E
    G = opts.granularity
    whole_groups = k % G == 0 and (opts.virtual_groups or G == 1 or opts.router_init == "zero")
    if opts.scale_mode == "megatron" and scale != 1.0:
        return False  # a^(1/3) on gate and up is exact for positively homogeneous activations only, not SiLU
    if rc.renormalize:
        return whole_groups and scale == G
    return whole_groups and opts.router_init == "zero" and scale == E * G / k


@dataclass
class LayerReport:
    """One converted layer: the output scale folded into its experts, whether the method is expected to
    reproduce the dense FFN exactly here, and max |MoE − dense| on float64 probe inputs (None: not measured)."""

    layer: int
    scale: float
    exact_expected: bool
    max_abs_error: float | None = None


@dataclass
class UpcycleReport:
    """The conversion report (docs/routers.md#upcycling-contract); ``to_dict()`` is plain data for a JSON file."""

    method: str
    seed: int
    options: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def probe_error(dense_mlp: nn.Module, moe_mlp: nn.Module, vocab_size: int, tokens: int, gen: torch.Generator,
                 device: torch.device) -> float:
    """max |MoE(x) − FFN(x)| over T random inputs, both layers copied to float64 (eval mode: no jitter)."""
    dense64 = copy.deepcopy(dense_mlp).to(torch.float64).eval()
    moe64 = copy.deepcopy(moe_mlp).to(torch.float64).eval()
    moe64.experts.backend = "reference"  # the only backend that runs float64 everywhere
    D = moe64.experts.hidden_size
    x_1TD = torch.randn(1, tokens, D, generator=gen, dtype=torch.float64).to(device)
    ids_1T = torch.randint(vocab_size, (1, tokens), generator=gen).to(device)  # for routers that hash ids
    with torch.no_grad():
        return (moe64(x_1TD, ids_1T)[0] - dense64(x_1TD)).abs().max().item()
