"""Dense ``MoEModel`` -> MoE ``MoEModel``: layer selection, target config, weight assembly, conversion report.

Shape legend: D model width, F dense FFN width, E experts, M expert width, G granularity, T probe tokens.

The new model is built on the meta device and every tensor is then assigned exactly once: non-FFN tensors
(and the FFNs of layers that stay dense) as clones of the dense model's, the converted layers' experts from
``moe.upcycle.methods``, and their routers built for real and initialised per docs/routers.md#router-init. A final
check refuses to return a model with any tensor left unassigned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moe.config import ModelConfig, MoEConfig
from moe.model import MoEModel
from moe.upcycle import methods
from moe.upcycle.options import (
    CopyOptions,
    DropOptions,
    GranularOptions,
    MethodOptions,
    NeuronSplitOptions,
    method_options,
    options_dict,
)
from moe.upcycle.report import LayerReport, UpcycleReport, exact_expected, probe_error
from moe.routing.registry import build_router

logger = logging.getLogger(__name__)

LayerSelection = str | Sequence[int] | None


# ----------------------------------------------------------------------------------------------- layers


def select_layers(layers: str | Sequence[int], num_layers: int, every_other_offset: int = 1) -> list[int]:
    """Resolve a layer selection (docs/routers.md#upcycling-contract) to sorted layer indices.

    Args:
        layers: ``"all"``, ``"every_other"`` (layers offset, offset+2, ...) or a list of layer indices.
        num_layers: layers in the model.
        every_other_offset: first layer of ``"every_other"`` (default 1: the 2nd, 4th, ... layer).
    """
    if isinstance(layers, str):
        if layers == "all":
            selected = list(range(num_layers))
        elif layers == "every_other":
            if every_other_offset < 0:
                raise ValueError(f"every_other_offset must be >= 0, got {every_other_offset}")
            selected = list(range(every_other_offset, num_layers, 2))
        else:
            raise ValueError(f"layers: unknown selection {layers!r}; valid: 'all', 'every_other' or a list of indices")
    else:
        selected = sorted(int(i) for i in layers)
        bad = [i for i in selected if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layers: index {bad[0]} is out of range for a {num_layers}-layer model "
                             f"(0..{num_layers - 1})")
        if len(set(selected)) != len(selected):
            raise ValueError(f"layers: duplicate indices in {list(layers)}")
    if not selected:
        raise ValueError(f"layers: {layers!r} selects no layer of a {num_layers}-layer model")
    return selected


def layer_pattern(selected: Sequence[int], num_layers: int) -> tuple[int, int]:
    """``(moe.first_dense_layers, moe.moe_every)`` whose MoE layers are exactly ``selected``.

    The model makes layer i MoE iff ``i >= first_dense_layers and (i - first_dense_layers) % moe_every == 0``,
    so the selection must be an arithmetic progression that runs to the last layer; ``ValueError`` otherwise.
    """
    first = selected[0]
    every = selected[1] - selected[0] if len(selected) > 1 else num_layers - first
    if list(selected) != list(range(first, num_layers, every)):
        raise ValueError(
            f"layers {list(selected)} cannot be expressed by moe.first_dense_layers and moe.moe_every: the MoE "
            f"layers must be every n-th layer from the first one to the end of the {num_layers}-layer model"
        )
    return first, every


def _resolve_layers(moe_cfg: MoEConfig, layers: LayerSelection, num_layers: int,
                    every_other_offset: int) -> tuple[MoEConfig, list[int]]:
    current = [i for i in range(num_layers) if moe_cfg.is_moe_layer(i)]
    if layers is None:
        if not current:
            raise ValueError(f"moe.first_dense_layers={moe_cfg.first_dense_layers} leaves no MoE layer in a "
                             f"{num_layers}-layer model")
        return moe_cfg, current
    selected = select_layers(layers, num_layers, every_other_offset)
    if selected == current:
        return moe_cfg, selected
    first, every = layer_pattern(selected, num_layers)
    if (moe_cfg.first_dense_layers, moe_cfg.moe_every) != (0, 1):
        raise ValueError(
            f"layers={layers!r} selects {selected} but moe.first_dense_layers={moe_cfg.first_dense_layers}, "
            f"moe.moe_every={moe_cfg.moe_every} make layers {current} MoE; set one of them, not both"
        )
    return dataclasses.replace(moe_cfg, first_dense_layers=first, moe_every=every), selected


# ------------------------------------------------------------------------------------- target config


def expert_width(method: str, options: MethodOptions, num_experts: int, intermediate_size: int) -> int:
    """The expert FFN width M each method produces from a dense width F; ``ValueError`` when F does not split."""
    F, E = intermediate_size, num_experts
    if isinstance(options, NeuronSplitOptions):
        if F % E:
            raise ValueError(f"neuron-split: moe.num_experts={E} must divide model.intermediate_size={F} "
                             "(each expert gets F/E neurons)")
        return F // E
    if isinstance(options, GranularOptions):
        G = options.granularity
        if E % G:
            raise ValueError(f"granular: moe.num_experts={E} must be a multiple of granularity={G} "
                             "(N % G != 0: the virtual groups would be incomplete)")
        if F % G:
            raise ValueError(f"granular: granularity={G} must divide model.intermediate_size={F}")
        return F // G
    return F


def target_moe_config(dense_cfg: ModelConfig, method: str, *, num_experts: int, top_k: int,
                      layers: LayerSelection = None, every_other_offset: int = 1, base: MoEConfig | None = None,
                      **options: Any) -> MoEConfig:
    """The MoE config an upcycled ``dense_cfg`` gets: ``base`` (router, capacity, backend; defaults if None)
    with E, k, the expert width the method implies and the layer pattern of ``layers`` filled in.

    Args:
        dense_cfg: the dense model's config.
        method: one of ``UPCYCLE_METHODS``.
        num_experts, top_k: E and k.
        layers: None keeps ``base``'s pattern (all layers by default); else as ``select_layers``.
        options: the method's options (as for ``upcycle``); only those that shape the model are used here.
    """
    opts = method_options(method, **options)
    base = base or MoEConfig()
    width = expert_width(method, opts, num_experts, dense_cfg.intermediate_size)
    cfg = dataclasses.replace(base, num_experts=num_experts, expert_hidden_size=width,
                              router=dataclasses.replace(base.router, top_k=top_k))
    if layers is not None:
        first, every = layer_pattern(select_layers(layers, dense_cfg.num_layers, every_other_offset),
                                     dense_cfg.num_layers)
        cfg = dataclasses.replace(cfg, first_dense_layers=first, moe_every=every)
    return cfg


def _output_scale(method: str, opts: MethodOptions, moe_cfg: MoEConfig) -> float:
    E, k = moe_cfg.num_experts, moe_cfg.router.top_k
    if isinstance(opts, NeuronSplitOptions):
        return float(opts.scale) if opts.scale is not None else E / k  # released LLaMA-MoE runs: s = E/k
    if isinstance(opts, GranularOptions):
        if opts.scale is not None:
            return float(opts.scale)
        if moe_cfg.router.name != "topk":
            raise ValueError(f"granular: the default scale is derived for the topk router only; set scale= "
                             f"explicitly for router {moe_cfg.router.name!r}")
        G = opts.granularity
        return float(G) if moe_cfg.router.renormalize else E * G / k  # He et al. 2024's weight scaling
    return 1.0


def _check_target(method: str, opts: MethodOptions, moe_cfg: MoEConfig, dense_cfg: ModelConfig) -> float:
    """Validate the target against the dense model and the method; returns the output scale."""
    want = expert_width(method, opts, moe_cfg.num_experts, dense_cfg.intermediate_size)
    if moe_cfg.expert_hidden_size != want:
        raise ValueError(f"moe.expert_hidden_size must be {want} for method {method} with "
                         f"model.intermediate_size={dense_cfg.intermediate_size}, got {moe_cfg.expert_hidden_size} "
                         "(target_moe_config derives it)")
    if moe_cfg.num_shared_experts:
        raise ValueError(f"moe.num_shared_experts must be 0 for upcycling (no method defines shared experts), "
                         f"got {moe_cfg.num_shared_experts}")
    k = moe_cfg.router.top_k
    if isinstance(opts, GranularOptions) and k % opts.granularity:
        warnings.warn(f"granular: top_k={k} is not a multiple of granularity={opts.granularity}; top-k selects "
                      "partial virtual groups, so the upcycled model does not start at the dense function "
                      "(see docs/routers.md)", UserWarning, stacklevel=3)
    if (isinstance(opts, (CopyOptions, DropOptions)) and moe_cfg.router.name == "topk"
            and not moe_cfg.router.renormalize):
        logger.warning("%s with softmax-then-top-k scales each FFN output by the selected probability mass "
                       "(about k/E) at step 0; the granular method with granularity=1 applies the weight "
                       "scaling of He et al. 2024 (see docs/routers.md)", method)
    return _output_scale(method, opts, moe_cfg)


# ------------------------------------------------------------------------------------------- assembly


def _seed(seed: int, layer: int, stream: str) -> int:
    """A reproducible 63-bit seed per (seed, layer, stream): independent streams, so that e.g. Drop-Upcycling
    with r=0 draws the same router as plain copying."""
    digest = hashlib.sha256(f"moe.upcycle:{seed}:{layer}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, layer: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(seed, layer, stream))


def _convert_layer(method: str, opts: MethodOptions, mlp: nn.Module, moe_cfg: MoEConfig, scale: float,
                   gen: torch.Generator) -> methods.ExpertWeights:
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    E = moe_cfg.num_experts
    if isinstance(opts, CopyOptions):
        experts = methods.copy_experts(gate, up, down, E)
        if opts.noise_std > 0:
            methods.add_neuron_noise(experts, opts.noise_std, opts.noise_ratio, gen)
        return experts
    if isinstance(opts, NeuronSplitOptions):
        parts_EM = methods.neuron_partition(gate, up, E, split=opts.split, proj_type=opts.proj_type,
                                            metric=opts.metric, max_iter=opts.max_iter, generator=gen)
        return methods.split_experts(gate, up, down, parts_EM, scale)
    if isinstance(opts, DropOptions):
        return methods.drop_experts(gate, up, down, E, ratio=opts.ratio,
                                    independent_indices_per_matrix=opts.independent_indices_per_matrix, generator=gen)
    return methods.granular_experts(gate, up, down, E, granularity=opts.granularity, scale=scale,
                                    scale_mode=opts.scale_mode)


def _build_router(opts: MethodOptions, moe_cfg: MoEConfig, hidden_size: int, seed: int, layer: int,
                  like: torch.Tensor) -> nn.Module:
    # The router's own defaults (biases, buffers, tables) come from its constructor, seeded from ours so the
    # result is reproducible and the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(seed, layer, "router-defaults"))
        router = build_router(moe_cfg, hidden_size)
    params = dict(router.named_parameters())
    if params:
        E, D = moe_cfg.num_experts, hidden_size
        weight = params.get("weight")
        if weight is None or tuple(weight.shape) != (E, D):
            raise ValueError(f"upcycle: router {moe_cfg.router.name!r} has no (E, D) 'weight' to initialise; "
                             "upcycling supports linear-gate routers (e.g. topk) and parameter-free ones (hash)")
        group = opts.granularity if isinstance(opts, GranularOptions) and opts.virtual_groups else 1
        w = methods.router_weight(E, D, init=opts.router_init, std=moe_cfg.router.init_std, group_size=group,
                                  generator=_generator(seed, layer, "router"), dtype=like.dtype)
        router.weight = nn.Parameter(w)
        for name, p in router.named_parameters():
            if name != "weight" and p.is_floating_point():
                p.data = p.data.to(like.dtype)
    return router.to(like.device)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, *, buffer: bool) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if buffer:
        module.register_buffer(attr, value, persistent=False)
    else:
        setattr(module, attr, value)


def upcycle_with_report(dense_model: MoEModel, moe_cfg: MoEConfig, method: str, *, seed: int,
                        layers: LayerSelection = None, every_other_offset: int = 1, probe_tokens: int = 16,
                        **options: Any) -> tuple[MoEModel, UpcycleReport]:
    """``upcycle``, also returning the conversion report (scales, expected exactness, probe errors).

    Args:
        probe_tokens: random float64 inputs per converted layer for ``max_abs_error`` (0: skip; each probe
            copies one layer's dense FFN and MoE layer to float64).
        Others: as ``upcycle``.
    """
    opts = method_options(method, **options)
    if not isinstance(dense_model, MoEModel) or dense_model.cfg.moe is not None:
        raise ValueError("upcycle needs a dense MoEModel (model.moe: null); got "
                         + (type(dense_model).__name__ if not isinstance(dense_model, MoEModel) else "an MoE model"))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"upcycle: seed must be an integer, got {seed!r}")
    if probe_tokens < 0:
        raise ValueError(f"upcycle: probe_tokens must be >= 0, got {probe_tokens}")
    dense_cfg = dense_model.cfg
    moe_cfg, selected = _resolve_layers(moe_cfg, layers, dense_cfg.num_layers, every_other_offset)
    scale = _check_target(method, opts, moe_cfg, dense_cfg)
    cfg = dataclasses.replace(dense_cfg, moe=moe_cfg)

    with torch.device("meta"):
        model = MoEModel(cfg)  # shapes only; every tensor is assigned below

    # 1. Everything outside the converted FFNs: bitwise clones (embeddings, attention, norms, head, dense FFNs).
    converted = tuple(f"layers.{i}.mlp." for i in selected)
    state = {name: t.detach().clone() for name, t in dense_model.state_dict().items()
             if not name.startswith(converted)}
    report = UpcycleReport(method=method, seed=seed, options=options_dict(opts))

    # 2. Converted layers: experts from the method, a fresh router (docs/routers.md#router-init).
    for i in selected:
        mlp = dense_model.layers[i].mlp
        experts = _convert_layer(method, opts, mlp, moe_cfg, scale, _generator(seed, i, "experts"))
        w_gate_up_ED2F, w_down_EFD = methods.expert_parameters(experts)
        state[f"layers.{i}.mlp.experts.w_gate_up_ED2F"] = w_gate_up_ED2F
        state[f"layers.{i}.mlp.experts.w_down_EFD"] = w_down_EFD
        router = _build_router(opts, moe_cfg, dense_cfg.hidden_size, seed, i, mlp.gate_proj.weight)
        model.layers[i].mlp.router = router
        state.update({f"layers.{i}.mlp.router.{k}": v for k, v in router.state_dict().items()})
        report.layers.append(LayerReport(layer=i, scale=experts.scale,
                                         exact_expected=exact_expected(opts, moe_cfg, scale)))
    model.load_state_dict(state, strict=True, assign=True)

    # 3. Ties (e.g. tie_word_embeddings) and non-persistent buffers (e.g. rotary tables), as in the dense model.
    tied: dict[int, list[str]] = {}
    for name, p in dense_model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    for names in tied.values():
        for name in names[1:]:
            if not name.startswith(converted):
                _set_tensor(model, name, model.get_parameter(names[0]), buffer=False)
    dense_buffers = dict(dense_model.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name in dense_buffers:
            _set_tensor(model, name, dense_buffers[name].detach().clone(), buffer=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"upcycle left tensors unassigned (a model change upcycling does not know): {left}")
    model.train(dense_model.training)

    if probe_tokens:
        device = dense_model.embed_tokens.weight.device
        for entry in report.layers:
            entry.max_abs_error = probe_error(dense_model.layers[entry.layer].mlp, model.layers[entry.layer].mlp,
                                               dense_cfg.vocab_size, probe_tokens,
                                               _generator(seed, entry.layer, "probe"), device)
    for entry in report.layers:
        logger.info("upcycle %s: layer %d scale %g exact_expected %s max_abs_error %s", method, entry.layer,
                    entry.scale, entry.exact_expected, entry.max_abs_error)
    return model, report


def upcycle(dense_model: MoEModel, moe_cfg: MoEConfig, method: str, *, seed: int, layers: LayerSelection = None,
            every_other_offset: int = 1, **options: Any) -> MoEModel:
    """A new MoE model from a dense one (docs/routers.md#upcycling): the chosen layers' FFNs become experts by
    ``method``, every other tensor is copied bitwise. The dense model is not modified.

    Args:
        dense_model: a ``MoEModel`` whose config has ``moe: null``.
        moe_cfg: the target MoE settings (router, E, k, expert width; ``target_moe_config`` derives one).
        method: one of ``UPCYCLE_METHODS``: ``copy``, ``neuron-split``, ``drop``, ``granular``.
        seed: seeds every random draw (router, partitions, re-initialisations) reproducibly, per layer.
        layers: which layers become MoE: None follows ``moe_cfg`` (all layers by default); ``"all"``,
            ``"every_other"`` or a list of indices set ``moe.first_dense_layers``/``moe.moe_every`` to match
            (a ``ValueError`` if ``moe_cfg`` already sets a different pattern or none can express the list).
        every_other_offset: first layer of ``"every_other"`` (default 1).
        options: the method's options (``CopyOptions``, ``NeuronSplitOptions``, ``DropOptions``,
            ``GranularOptions``); ``parse_method_options`` reads them from ``key=value`` strings.
    Returns:
        The MoE model, on the dense model's device, each tensor in the dtype of its dense source.
    """
    model, _ = upcycle_with_report(dense_model, moe_cfg, method, seed=seed, layers=layers,
                                   every_other_offset=every_other_offset, probe_tokens=0, **options)
    return model
