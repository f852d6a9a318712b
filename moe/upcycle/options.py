"""The settings of each upcycling method, as plain dataclasses, and their parsing from ``key=value`` strings.

Each method has one ``@dataclass(kw_only=True)`` of options, validated in ``__post_init__``; unknown keys and
wrong types are ``ValueError``s through ``moe.config_io.from_dict``, exactly as for recipes. A CLI turns
``--option granularity=8 --option scale_mode=megatron`` into keyword arguments with ``parse_method_options``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from moe.config_io import apply_overrides, from_dict, require as _require, to_dict

UPCYCLE_METHODS = ("copy", "neuron-split", "drop", "granular")

# Router weight initialisations (docs/routers.md#router-init): "normal" N(0, std²), the T5X sparse-upcycling recipe;
# "zero" exactly uniform logits; "uniform" zero-mean uniform with the same std (Drop-Upcycling's
# ``torch_rand_002``). The std is ``moe.router.init_std`` (0.02 by default).
RouterInit = Literal["normal", "zero", "uniform"]
ROUTER_INITS = ("normal", "zero", "uniform")


@dataclass(kw_only=True)
class CopyOptions:
    """Sparse upcycling (Komatsuzaki et al., ICLR 2023): every expert a copy of the dense FFN."""

    router_init: RouterInit = "normal"
    # "Noise upcycling", the baseline of the Drop-Upcycling repository, NOT part of sparse upcycling
    # (docs/routers.md#copy): add N(0, noise_std²) to the gate and up rows and down columns of a random
    # noise_ratio of the neurons, per expert. 0 (the default) keeps the experts exact copies.
    noise_std: float = 0.0
    noise_ratio: float = 1.0

    def __post_init__(self) -> None:
        _require(self.noise_std >= 0, f"upcycle.copy.noise_std must be >= 0, got {self.noise_std}")
        _require(0 <= self.noise_ratio <= 1, f"upcycle.copy.noise_ratio must be in [0, 1], got {self.noise_ratio}")


@dataclass(kw_only=True)
class NeuronSplitOptions:
    """LLaMA-MoE neuron partitioning (Zhu et al. 2024): expert e owns F/E of the dense FFN's neurons."""

    # random: a balanced random partition; clustering: size-constrained k-means on the normalised rows.
    split: Literal["random", "clustering"] = "random"
    # Output scale s, folded into the down projection. null: E/k, the released LLaMA-MoE runs (a heuristic).
    # With k = E and a uniform router (router_init=zero) the weights are 1/E and s = E reproduces the dense FFN.
    scale: float | None = None
    router_init: RouterInit = "normal"
    # clustering only: which matrix's rows to cluster, the metric, the iteration bound.
    proj_type: Literal["up", "gate"] = "up"
    metric: Literal["l2", "cos"] = "l2"
    max_iter: int = 500

    def __post_init__(self) -> None:
        _require(self.scale is None or self.scale > 0,
                 f"upcycle.neuron-split.scale must be > 0 or null, got {self.scale}")
        _require(self.max_iter >= 1, f"upcycle.neuron-split.max_iter must be >= 1, got {self.max_iter}")


@dataclass(kw_only=True)
class DropOptions:
    """Drop-Upcycling (Nakamura et al., ICLR 2025): copies with a ratio of each expert's neurons re-initialised."""

    # r: each expert re-initialises floor(r·F) neurons (0 is sparse upcycling, 1 a statistics-matched init).
    ratio: float = 0.5
    # False: one index set per expert for the gate rows, up rows and down columns (whole neurons, our default).
    # True: an independent set per matrix, as the released conversion script does.
    independent_indices_per_matrix: bool = False
    router_init: RouterInit = "uniform"

    def __post_init__(self) -> None:
        _require(0 <= self.ratio <= 1, f"upcycle.drop.ratio must be in [0, 1], got {self.ratio}")


@dataclass(kw_only=True)
class GranularOptions:
    """NVIDIA fine-grained upcycling with virtual groups (He et al. 2024)."""

    # G: each expert is one of G contiguous shards of the dense FFN (expert width F/G); N % G must be 0.
    granularity: int = 1
    # The weight scaling a. null: G for top-k-then-softmax (renormalize), N·G/k for softmax-then-top-k.
    scale: float | None = None
    # down: all of a on the down projection (exact for every activation); megatron: a^(1/3) on each of gate,
    # up and down, as Megatron-Core does for GLU experts (exact only for positively homogeneous activations).
    scale_mode: Literal["down", "megatron"] = "down"
    # Tie the router rows of each virtual group {rG, ..., rG+G-1} (expert e uses row floor(e/G)).
    virtual_groups: bool = True
    router_init: RouterInit = "normal"

    def __post_init__(self) -> None:
        _require(self.granularity >= 1, f"upcycle.granular.granularity must be >= 1, got {self.granularity}")
        _require(self.scale is None or self.scale > 0, f"upcycle.granular.scale must be > 0 or null, got {self.scale}")


METHOD_OPTIONS: dict[str, type] = {
    "copy": CopyOptions,
    "neuron-split": NeuronSplitOptions,
    "drop": DropOptions,
    "granular": GranularOptions,
}
MethodOptions = CopyOptions | NeuronSplitOptions | DropOptions | GranularOptions


def check_method(method: str) -> None:
    """``ValueError`` listing the valid methods unless ``method`` is one."""
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown upcycling method {method!r}; valid methods: {', '.join(UPCYCLE_METHODS)}")


def method_options(method: str, **options: Any) -> MethodOptions:
    """The validated options dataclass of ``method`` from keyword values (unknown keys are errors)."""
    check_method(method)
    return from_dict(METHOD_OPTIONS[method], options, f"upcycle.{method}")


def parse_method_options(method: str, items: Sequence[str]) -> dict[str, Any]:
    """``["granularity=8", "scale_mode=megatron"]`` -> ``{"granularity": 8, "scale_mode": "megatron"}``.

    Values are read as YAML (numbers, true/false, null), then checked against the method's options, so the
    result can go straight into ``upcycle(..., **options)``. Raises ``ValueError`` naming the bad item.
    """
    check_method(method)
    data: dict[str, Any] = {}
    for item in items:
        key = item.partition("=")[0].strip()
        if "." in key:
            raise ValueError(f"upcycle option {item!r}: expected key=value with a plain key, e.g. ratio=0.5")
        apply_overrides(data, [item])
    method_options(method, **data)  # validates
    return data


def options_dict(options: MethodOptions) -> dict[str, Any]:
    """Every option of a method with its resolved value (for reports)."""
    return to_dict(options) if dataclasses.is_dataclass(options) else dict(options)
