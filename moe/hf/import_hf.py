"""``moe import HF_DIR OUT_DIR``: a Hugging Face folder (``config.json`` + weights) -> one of our run directories.

Shape legend: D model width, W shared-expert width.

    .venv/bin/python -m moe import path/to/Qwen1.5-MoE-A2.7B runs/qwen-moe

Which ``model_type`` values map to which of our settings is in ``moe.hf.config_map``; how names and expert
tensors map in ``moe.hf.weights``. Weights keep their stored dtype in ``model.safetensors``; tokenizer and
generation files are copied beside them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe.config import ModelConfig
from moe.hf.config_import import model_config_from_hf
from moe.hf.weights import from_hf_state_dict, one_line, read_hf_weights
from moe.rundir import check_state, copy_side_files, is_run_dir, read_run, write_run

log = logging.getLogger(__name__)


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face folder as a dict, with one-line errors."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise ValueError(f"{folder}: not a directory")
    if not path.is_file():
        raise ValueError(f"{path}: does not exist (a Hugging Face model folder has config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


def _drop_exact_shared_expert_tricks(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> ModelConfig:
    """Undo, exactly, the two ways export fits our models into Qwen2-MoE's always-gated shared expert.

    A shared expert whose down projections are all zero adds exactly 0: the model has none. A gate whose weights
    are all zero is sigmoid(0) = 1/2 for every token: the model is ungated with the down projection halved (exact:
    a power-of-two scale). Trained models have neither, so they import gated, as they are.
    """
    m = cfg.moe
    if m is None or not m.num_shared_experts:
        return cfg
    layers = [i for i in range(cfg.num_layers) if m.is_moe_layer(i)]
    downs = [state.get(f"layers.{i}.mlp.shared_experts.down_proj.weight") for i in layers]
    gates = [state.get(f"layers.{i}.mlp.shared_expert_gate.weight") for i in layers]
    if any(t is None for t in downs + gates):
        return cfg  # incomplete: check_state names what is missing
    if not any(bool(t.any()) for t in downs):
        for i in layers:
            for name in [k for k in state if k.startswith(f"layers.{i}.mlp.shared_expert")]:
                del state[name]
        moe = dataclasses.replace(m, num_shared_experts=0, shared_expert_hidden_size=None, shared_expert_gate=False)
    elif m.shared_expert_gate and not any(bool(t.any()) for t in gates):
        for i in layers:
            name = f"layers.{i}.mlp.shared_experts.down_proj.weight"
            state[name] = state[name] * 0.5
            del state[f"layers.{i}.mlp.shared_expert_gate.weight"]
        moe = dataclasses.replace(m, shared_expert_gate=False)
    else:
        return cfg
    return dataclasses.replace(cfg, moe=moe)


def _strip_padding(cfg: ModelConfig, state: dict[str, torch.Tensor], model_type: str) -> ModelConfig:
    """glm4_moe / dots1: drop the shared-expert units that are all zero (export pads the width to a multiple of F
    with them; removing a unit whose gate, up and down weights are zero is exact), zero-width shared experts, and
    GLM's multi-token-prediction layers (beyond ``num_hidden_layers``; inference does not run them)."""
    if model_type not in ("glm4_moe", "dots1"):
        return cfg
    for name in [k for k in state if k.startswith("layers.") and int(k.split(".")[1]) >= cfg.num_layers]:
        del state[name]
    m = cfg.moe
    if m is None:
        return cfg
    layers = [i for i in range(cfg.num_layers) if m.is_moe_layer(i)]
    if not m.num_shared_experts:
        for i in layers:
            for name in [k for k in state if k.startswith(f"layers.{i}.mlp.shared_experts.") and not state[k].numel()]:
                del state[name]
        return cfg
    names = [[f"layers.{i}.mlp.shared_experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
             for i in layers]
    if any(n not in state for group in names for n in group):
        return cfg  # incomplete: check_state names what is missing
    width = m.shared_hidden_size
    while width > 0 and all(not state[g][width - 1].any() and not state[u][width - 1].any()
                            and not state[d][:, width - 1].any() for g, u, d in names):
        width -= 1
    if width == m.shared_hidden_size:
        return cfg
    for g, u, d in names:
        state[g], state[u], state[d] = state[g][:width], state[u][:width], state[d][:, :width]
    if width == 0:
        moe = dataclasses.replace(m, num_shared_experts=0, shared_expert_hidden_size=None)
        for group in names:
            for n in group:
                del state[n]
    else:
        exact = width == m.num_shared_experts * m.expert_hidden_size
        moe = dataclasses.replace(m, shared_expert_hidden_size=None if exact else width)
    return dataclasses.replace(cfg, moe=moe)


def _write_generation_config(raw: dict[str, Any], out: Path) -> None:
    """Keep config.json's special token ids (generation stops at eos) when the folder has no generation_config."""
    ids = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None}
    if ids:
        (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")


def read_hf_model(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """Our config and state dict for a Hugging Face folder, and its ``model_type``; ``ValueError`` if unsupported."""
    folder = Path(folder)
    raw = read_hf_config(folder)
    cfg = model_config_from_hf(raw, str(folder / "config.json"))
    state = from_hf_state_dict(read_hf_weights(folder), cfg, str(folder))
    cfg = _drop_exact_shared_expert_tricks(cfg, state)
    cfg = _strip_padding(cfg, state, raw["model_type"])
    check_state(state, cfg, str(folder))
    return cfg, state, raw["model_type"]


@dataclass
class ImportResult:
    model_type: str
    config: ModelConfig
    num_parameters: int
    copied: list[str]
    out_dir: Path


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> ImportResult:
    """Convert the Hugging Face folder ``hf_dir`` into the run directory ``out_dir``.

    Returns:
        what was imported: the source ``model_type``, our config, the parameter count, the copied side files.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if out.resolve() == hf_dir.resolve():
        raise ValueError(f"{out}: the output directory must differ from the Hugging Face folder")
    cfg, state, model_type = read_hf_model(hf_dir)
    write_run(out, cfg, state)
    copied = copy_side_files(hf_dir, out)
    if "generation_config.json" not in copied:
        _write_generation_config(read_hf_config(hf_dir), out)
    log.debug("imported %s from %s into %s (%s)", model_type, hf_dir, out, ", ".join(copied) or "no tokenizer files")
    return ImportResult(model_type=model_type, config=cfg, num_parameters=sum(t.numel() for t in state.values()),
                        copied=copied, out_dir=out)


def read_model_folder(path: str | Path, where: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and weights of a run directory or a Hugging Face folder; ``where`` prefixes the error."""
    path = Path(path)
    if is_run_dir(path):
        recipe, state = read_run(path)
        return recipe.model, state
    if (path / "config.json").is_file():
        cfg, state, _ = read_hf_model(path)
        return cfg, state
    raise ValueError(f"{where}: expected a model folder: a run directory (recipe.yaml + model.safetensors, from "
                     "`moe train` or `moe import`) or a Hugging Face folder (config.json + weights)")
