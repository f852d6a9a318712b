"""Dense SwiGLU FFN -> E experts, one pure function per upcycling method (docs/routers.md#upcycling), plus router init.

Shape legend: D model width, F dense FFN width, E experts, M expert width (F for copy and drop, F/E for
neuron-split, F/G for granular), G granularity.

Inputs are the dense weights in ``nn.Linear`` layout, as ``moe.ffn.SwiGLU`` holds them: ``gate_FD`` and
``up_FD`` (one row per intermediate neuron) and ``down_DF`` (one column per neuron). Outputs are stacked in
the same layout, ``gate_EMD``, ``up_EMD``, ``down_EDM``, each a fresh allocation (never an ``expand`` view of
the dense tensor: experts sharing storage would receive the same in-place optimizer update,
docs/routers.md#upcycling-contract).
Random draws come from the CPU generator passed in and are made in fp32 (float64 for float64 weights),
then cast, so that bf16 weights are not re-initialised in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe.upcycle.clustering import balanced_kmeans, parts_from_labels, random_partition


@dataclass
class ExpertWeights:
    """The experts of one converted layer.

    Attributes:
        gate_EMD, up_EMD: (E, M, D) per-expert gate and up projections (``nn.Linear`` layout).
        down_EDM: (E, D, M) per-expert down projections.
        scale: the output scale folded into the weights (1 when none).
    """

    gate_EMD: torch.Tensor
    up_EMD: torch.Tensor
    down_EDM: torch.Tensor
    scale: float = 1.0


def _draw_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.promote_types(w.dtype, torch.float32)


def copy_experts(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, num_experts: int) -> ExpertWeights:
    """Sparse upcycling (Komatsuzaki et al., ICLR 2023): E identical copies, bitwise, in fresh storage."""
    E = num_experts
    return ExpertWeights(
        gate_EMD=gate_FD.detach().unsqueeze(0).repeat(E, 1, 1),  # repeat copies; expand would alias
        up_EMD=up_FD.detach().unsqueeze(0).repeat(E, 1, 1),
        down_EDM=down_DF.detach().unsqueeze(0).repeat(E, 1, 1),
    )


def _neuron_count(ratio: float, num_neurons: int) -> int:
    return math.floor(ratio * num_neurons)


def add_neuron_noise(experts: ExpertWeights, std: float, ratio: float, generator: torch.Generator) -> None:
    """Noise upcycling (the Drop-Upcycling repository's baseline): in place, per expert, add N(0, std²) to the
    gate and up rows and down columns of floor(ratio·M) random neurons (one index set per expert)."""
    E, M, D = experts.gate_EMD.shape
    n = _neuron_count(ratio, M)
    for e in range(E):
        idx = torch.randperm(M, generator=generator)[:n]
        for w, dim in ((experts.gate_EMD, 0), (experts.up_EMD, 0), (experts.down_EDM, 1)):
            shape = (n, D) if dim == 0 else (D, n)
            noise = (torch.randn(shape, generator=generator, dtype=_draw_dtype(w)) * std)
            rows = w[e].index_select(dim, idx.to(w.device))
            w[e].index_copy_(dim, idx.to(w.device), (rows.to(noise.dtype) + noise.to(w.device)).to(w.dtype))


def neuron_partition(
    gate_FD: torch.Tensor, up_FD: torch.Tensor, num_experts: int, *, split: str, proj_type: str = "up",
    metric: str = "l2", max_iter: int = 500, generator: torch.Generator,
) -> torch.Tensor:
    """LLaMA-MoE index sets (Zhu et al. 2024): (E, F/E) int64, row e the sorted neurons of expert e, disjoint,
    covering."""
    F = gate_FD.shape[0]
    if split == "random":
        return random_partition(F, num_experts, generator)
    rows_FD = up_FD if proj_type == "up" else gate_FD
    labels_F = balanced_kmeans(rows_FD, num_experts, metric=metric, max_iter=max_iter, generator=generator)
    return parts_from_labels(labels_F, num_experts)


def split_experts(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, parts_EM: torch.Tensor,
                  scale: float) -> ExpertWeights:
    """Expert e uses ``gate[S_e]``, ``up[S_e]``, ``down[:, S_e]`` (the same S_e for all three), with the output
    scale s folded into the down projection: ``s · FFN_e(x)`` is the expert with ``s · down``."""
    idx_EM = parts_EM.to(gate_FD.device)
    E, M = idx_EM.shape
    flat = idx_EM.reshape(-1)
    gate_EMD = gate_FD.detach().index_select(0, flat).view(E, M, -1)
    up_EMD = up_FD.detach().index_select(0, flat).view(E, M, -1)
    down_DEM = down_DF.detach().index_select(1, flat).view(down_DF.shape[0], E, M)
    down_EDM = down_DEM.permute(1, 0, 2).contiguous()
    if scale != 1.0:
        down_EDM = down_EDM * scale
    return ExpertWeights(gate_EMD=gate_EMD, up_EMD=up_EMD, down_EDM=down_EDM, scale=scale)


def drop_experts(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, num_experts: int, *,
                 ratio: float, independent_indices_per_matrix: bool, generator: torch.Generator) -> ExpertWeights:
    """Drop-Upcycling (Nakamura et al., ICLR 2025): copies, then per expert floor(r·F) neurons re-drawn from
    N(μ, σ²) of the dense matrix they belong to (μ, σ per matrix, over the whole dense matrix, computed in fp32
    or wider).

    With ``independent_indices_per_matrix`` the gate rows, up rows and down columns get separate index sets
    (the released script); otherwise one set per expert re-initialises whole neurons.
    """
    experts = copy_experts(gate_FD, up_FD, down_DF, num_experts)
    F = gate_FD.shape[0]
    n = _neuron_count(ratio, F)
    if n == 0:
        return experts
    mats = ((experts.gate_EMD, gate_FD, 0), (experts.up_EMD, up_FD, 0), (experts.down_EDM, down_DF, 1))
    stats = []
    for _, dense, _ in mats:
        w = dense.detach().to(_draw_dtype(dense))
        stats.append((w.mean(), w.std()))
    for e in range(num_experts):
        shared = torch.randperm(F, generator=generator)[:n]
        for m, ((w_EMD, dense, dim), (mu, sigma)) in enumerate(zip(mats, stats)):
            # NOTE: a fresh draw per expert (and per matrix when independent); re-using one draw would make the
            # re-initialisations identical across experts.
            idx = torch.randperm(F, generator=generator)[:n] if independent_indices_per_matrix and m > 0 else shared
            other = dense.shape[1 - dim]
            shape = (n, other) if dim == 0 else (other, n)
            fresh = torch.randn(shape, generator=generator, dtype=mu.dtype).to(mu.device) * sigma + mu
            w_EMD[e].index_copy_(dim, idx.to(w_EMD.device), fresh.to(w_EMD.device, w_EMD.dtype))
    return experts


def granular_experts(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, num_experts: int, *,
                     granularity: int, scale: float, scale_mode: str) -> ExpertWeights:
    """NVIDIA fine-grained upcycling (He et al. 2024): G contiguous shards of the intermediate axis (gate and up split
    separately, the g-th pieces paired), expert e gets shard ``e mod G``; the weight scaling ``a`` goes all on
    the down projection (``scale_mode="down"``) or ``a^(1/3)`` on each of gate, up and down ("megatron")."""
    G = granularity
    F = gate_FD.shape[0]
    M = F // G
    parts_EM = (torch.arange(num_experts)[:, None] % G) * M + torch.arange(M)[None, :]  # (E, M) shard of e
    experts = split_experts(gate_FD, up_FD, down_DF, parts_EM, 1.0)
    if scale_mode == "megatron":
        c = scale ** (1.0 / 3.0)
        experts.gate_EMD = experts.gate_EMD * c
        experts.up_EMD = experts.up_EMD * c
        experts.down_EDM = experts.down_EDM * c
    elif scale != 1.0:
        experts.down_EDM = experts.down_EDM * scale
    experts.scale = scale
    return experts


def router_weight(num_experts: int, hidden_size: int, *, init: str, std: float, group_size: int = 1,
                  generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A router weight (E, D) initialised as docs/routers.md#router-init lists, with rows tied in consecutive groups.

    Args:
        init: ``normal`` N(0, std²); ``zero``; ``uniform`` zero-mean uniform with standard deviation std
            (the released Drop-Upcycling ``torch_rand_002``: centred by the sample mean, times std·√12).
        group_size: G; E/G rows are drawn and each repeated G times (virtual groups, He et al. 2024), so expert e
            uses row ``floor(e/G)``. 1 draws E independent rows.
    Returns:
        (E, D) in ``dtype`` (draws in fp32 or wider).
    """
    rows = num_experts // group_size
    draw = torch.promote_types(dtype, torch.float32)
    if init == "zero":
        w = torch.zeros(rows, hidden_size, dtype=draw)
    elif init == "normal":
        w = torch.randn(rows, hidden_size, generator=generator, dtype=draw) * std
    elif init == "uniform":
        u = torch.rand(rows, hidden_size, generator=generator, dtype=draw)
        w = (u - u.mean()) * (std * math.sqrt(12.0))
    else:  # options are validated before; a bug here, not user input
        raise AssertionError(f"router init {init!r}")
    return w.repeat_interleave(group_size, dim=0).to(dtype)


def expert_parameters(experts: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe.experts.Experts`` layout: ``w_gate_up_ED2F`` (E, D, 2M) gate columns then up, and ``w_down_EFD``."""
    gate_up_ED2M = torch.cat((experts.gate_EMD.transpose(1, 2), experts.up_EMD.transpose(1, 2)), dim=2)
    down_EMD = experts.down_EDM.transpose(1, 2).contiguous()
    return gate_up_ED2M.contiguous(), down_EMD
