"""Weight files of Hugging Face folders, read safely, and the name/layout mapping between theirs and ours.

Shape legend: E experts, D model width, F expert hidden width, W shared-expert width.

Reading: ``model.safetensors.index.json`` (shards), ``model.safetensors``, and only then pickled
``pytorch_model.bin[.index.json]`` through ``torch.load(weights_only=True)``, which refuses any pickle that would
build an object other than tensors and containers (nothing in the file runs). Every failure is a one-line
``ValueError`` naming the file.

Mapping (per layer ``i``; ours on the left, see ``moe.model``/``moe.experts``):

    layers.i.mlp.router.weight             [E, D]      model.layers.i.{mlp|block_sparse_moe}.gate.weight
    layers.i.mlp.experts.w_gate_up_ED2F    [E, D, 2F]  experts.j.{gate_proj|w1}.weight [F, D] (cols :F, transposed)
                                                       experts.j.{up_proj|w3}.weight   [F, D] (cols F:, transposed)
    layers.i.mlp.experts.w_down_EFD        [E, F, D]   experts.j.{down_proj|w2}.weight [D, F] (transposed)
    layers.i.mlp.shared_experts.*          [W, D] ...  model.layers.i.mlp.shared_expert.*  (qwen2_moe)
                                                       model.layers.i.mlp.shared_experts.* (glm4_moe, dots1: the
                                                       width padded with zero units to a multiple of F, exact)
    layers.i.mlp.shared_expert_gate.weight [1, D]      model.layers.i.mlp.shared_expert_gate.weight
    layers.i.mlp.router.e_score_correction_bias [E]    model.layers.i.mlp.gate.e_score_correction_bias
                                                       (glm4_moe, dots1; zeros for a router without the bias)
    everything else                                    the same name under ``model.`` (``lm_head`` at the top)

The remote-code layout (``moe_train``) keeps our names under ``model.``, experts and router buffers included.

Per-expert names (Mixtral ``block_sparse_moe.experts.j.w1``, Qwen ``mlp.experts.j.gate_proj``) are what
``save_pretrained`` writes and what the Hub holds, so export writes them. Import also reads the fused form that
transformers 5 uses in memory (``mlp.experts.gate_up_proj [E, 2F, D]``, ``mlp.experts.down_proj [E, D, F]``),
which ``to_hf_state_dict(..., fused_experts=True)`` produces for ``load_state_dict`` into a transformers model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from moe.checkpoint import load_safetensors, one_line
from moe.config import ModelConfig

_MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")  # (gate, up, down)
_QWEN_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
_MOE_KEY = re.compile(r"^layers\.(\d+)\.(?:mlp|block_sparse_moe)\.(.+)$")


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything beyond tensors; RuntimeError for a damaged file
        # Keep torch's reason (e.g. "Unsupported global: GLOBAL io.open"), not its advice to load unsafely.
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. |\n|$)", str(e))
        reason = found.group(1).strip() if found and found.group(1).strip() else one_line(e, 120)
        raise ValueError(f"{path}: refused: torch.load(weights_only=True) cannot read it as plain tensors "
                         f"({reason}); use safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of names to tensors")
    return state


def _shards(folder: Path, index_name: str) -> list[Path]:
    index = folder / index_name
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a valid weight index ({one_line(e)})") from None
    for name in files:
        if not (folder / name).is_file():
            raise ValueError(f"{folder / name}: weight file listed in {index_name} does not exist")
    return [folder / name for name in files]


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder, under their names in the files."""
    folder = Path(folder)
    if (folder / "model.safetensors.index.json").is_file():
        files, loader = _shards(folder, "model.safetensors.index.json"), load_safetensors
    elif (folder / "model.safetensors").is_file():
        files, loader = [folder / "model.safetensors"], load_safetensors
    elif (folder / "pytorch_model.bin.index.json").is_file():
        files, loader = _shards(folder, "pytorch_model.bin.index.json"), load_pickle
    elif (folder / "pytorch_model.bin").is_file():
        files, loader = [folder / "pytorch_model.bin"], load_pickle
    else:
        raise ValueError(f"{folder}: no weights (expected model.safetensors, model.safetensors.index.json, "
                         "pytorch_model.bin or pytorch_model.bin.index.json)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        for name, t in loader(path).items():
            if name in state:
                raise ValueError(f"{path}: tensor {name} also appears in another shard")
            state[name] = t
    return state


def _moe_names(layout: str) -> tuple[str, tuple[str, str, str]]:
    if layout in ("mixtral", "phimoe"):
        return "block_sparse_moe", _MIXTRAL_EXPERT_NAMES
    return "mlp", _QWEN_EXPERT_NAMES


def to_hf_state_dict(state: Mapping[str, torch.Tensor], cfg: ModelConfig, layout: str, *,
                     fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict under ``layout``'s names and shapes (``lm_head.weight`` passes through as given).

    Args:
        state: our parameter names -> tensors.
        cfg: the model's config.
        layout: a ``config_map.export_layout`` result.
        fused_experts: transformers 5's in-memory expert tensors instead of the per-expert files.
    """
    prefix, (gate_n, up_n, down_n) = ("mlp", ("", "", "")) if fused_experts else _moe_names(layout)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            out[name] = t
            continue
        if layout == "moe_train":
            out[f"model.{name}"] = t
            continue
        m = _MOE_KEY.match(name)
        rest = m.group(2) if m else ""
        if m and rest in ("router.weight", "experts.w_gate_up_ED2F", "experts.w_down_EFD"):
            base = f"model.layers.{m.group(1)}.{prefix}"
            if rest == "router.weight":
                out[f"{base}.gate.weight"] = t
            elif fused_experts:  # [E, D, 2F] -> [E, 2F, D]; [E, F, D] -> [E, D, F]
                fused = "gate_up_proj" if rest == "experts.w_gate_up_ED2F" else "down_proj"
                out[f"{base}.experts.{fused}"] = t.transpose(1, 2)
            elif rest == "experts.w_gate_up_ED2F":
                F = t.shape[2] // 2
                for j in range(t.shape[0]):
                    out[f"{base}.experts.{j}.{gate_n}.weight"] = t[j, :, :F].T  # [F, D]
                    out[f"{base}.experts.{j}.{up_n}.weight"] = t[j, :, F:].T
            else:
                for j in range(t.shape[0]):
                    out[f"{base}.experts.{j}.{down_n}.weight"] = t[j].T  # [D, F]
        elif m and rest == "router.e_score_correction_bias":
            out[f"model.layers.{m.group(1)}.{prefix}.gate.e_score_correction_bias"] = t
        elif m and rest.startswith("shared_experts.") and layout == "qwen2_moe":
            out[f"model.layers.{m.group(1)}.mlp.shared_expert.{rest.removeprefix('shared_experts.')}"] = t
        else:
            out[f"model.{name}"] = t
    if layout == "qwen2_moe":
        _qwen2_moe_shared_expert(out, cfg)
    if layout in ("glm4_moe", "dots1"):
        _sigmoid_moe_extras(out, cfg)
    return {k: v.contiguous() for k, v in out.items()}


def _sigmoid_moe_extras(out: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """GLM-4-MoE and dots.llm1 always have a selection bias and ``n_shared_experts · F`` shared units. A router
    without the bias gets zeros (it then only adds 0 before the top-k); the shared width is padded with zero units
    (gate and up rows, down columns of zeros: silu(0)·0 = 0, exactly), or is 0 without shared experts."""
    m = cfg.moe
    assert m is not None
    D, W = cfg.hidden_size, m.shared_hidden_size
    pad = -(-W // m.expert_hidden_size) * m.expert_hidden_size - W
    for i in (i for i in range(cfg.num_layers) if m.is_moe_layer(i)):
        base = f"model.layers.{i}.mlp"
        like = out[f"{base}.gate.weight"]
        out.setdefault(f"{base}.gate.e_score_correction_bias", torch.zeros(m.num_experts, dtype=torch.float32))
        if W == 0:
            for proj in ("gate_proj", "up_proj"):
                out[f"{base}.shared_experts.{proj}.weight"] = like.new_zeros(0, D)
            out[f"{base}.shared_experts.down_proj.weight"] = like.new_zeros(D, 0)
        elif pad:
            for proj in ("gate_proj", "up_proj"):
                t = out[f"{base}.shared_experts.{proj}.weight"]
                out[f"{base}.shared_experts.{proj}.weight"] = torch.cat((t, t.new_zeros(pad, D)))
            t = out[f"{base}.shared_experts.down_proj.weight"]
            out[f"{base}.shared_experts.down_proj.weight"] = torch.cat((t, t.new_zeros(D, pad)), dim=1)


def _qwen2_moe_shared_expert(out: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Qwen2-MoE always has a sigmoid-gated shared expert. Express ours exactly:

    - none: a width-1 expert of zeros (it adds exactly 0);
    - ungated: a zero gate, sigmoid(0) = 1/2, and the down projection doubled (scaling by 2 and 1/2 is exact).
    """
    m = cfg.moe
    assert m is not None
    D = cfg.hidden_size
    for i in (i for i in range(cfg.num_layers) if m.is_moe_layer(i)):
        base = f"model.layers.{i}.mlp"
        like = out[f"{base}.gate.weight"]
        if m.num_shared_experts == 0:
            for proj in ("gate_proj", "up_proj"):
                out[f"{base}.shared_expert.{proj}.weight"] = like.new_zeros(1, D)
            out[f"{base}.shared_expert.down_proj.weight"] = like.new_zeros(D, 1)
        elif not m.shared_expert_gate:
            out[f"{base}.shared_expert.down_proj.weight"] = out[f"{base}.shared_expert.down_proj.weight"] * 2
        if not m.shared_expert_gate:
            out[f"{base}.shared_expert_gate.weight"] = like.new_zeros(1, D)


def from_hf_state_dict(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Hugging Face tensors (per-expert or fused) under our names and shapes; unknown names are errors."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (layer, expert) -> {gate, up, down}
    for hf_name, t in hf.items():
        if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
            continue
        name = hf_name if hf_name == "lm_head.weight" else hf_name.removeprefix("model.")
        m = _MOE_KEY.match(name)
        if m is None:
            out[name] = t
            continue
        i, rest = int(m.group(1)), m.group(2)
        per_expert = re.fullmatch(r"experts\.(\d+)\.(\w+)\.weight", rest)
        if rest == "gate.weight":
            out[f"layers.{i}.mlp.router.weight"] = t
        elif rest == "experts.gate_up_proj":  # fused [E, 2F, D]
            out[f"layers.{i}.mlp.experts.w_gate_up_ED2F"] = t.transpose(1, 2)
        elif rest == "experts.down_proj":  # fused [E, D, F]
            out[f"layers.{i}.mlp.experts.w_down_EFD"] = t.transpose(1, 2)
        elif per_expert and per_expert.group(2) in (*_MIXTRAL_EXPERT_NAMES, *_QWEN_EXPERT_NAMES):
            role = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up"}.get(per_expert.group(2), "down")
            experts.setdefault((i, int(per_expert.group(1))), {})[role] = t
        elif rest.startswith("shared_expert."):
            out[f"layers.{i}.mlp.shared_experts.{rest.removeprefix('shared_expert.')}"] = t
        elif rest == "shared_expert_gate.weight":
            out[f"layers.{i}.mlp.shared_expert_gate.weight"] = t
        elif rest == "gate.e_score_correction_bias":
            out[f"layers.{i}.mlp.router.e_score_correction_bias"] = t
        else:
            out[name] = t  # a dense MLP (mlp.gate_proj, ...) or an unknown name that the shape check reports
    for i in sorted({i for i, _ in experts}):
        E = cfg.moe.num_experts if cfg.moe is not None else 0
        parts = [experts.get((i, j), {}) for j in range(E)]
        missing = [f"expert {j} {role}" for j, p in enumerate(parts)
                   for role in ("gate", "up", "down") if role not in p]
        if missing or len(parts) != len([key for key in experts if key[0] == i]):
            raise ValueError(f"{where}: layer {i}: expert weights incomplete or beyond num_experts={E} "
                             f"({', '.join(missing[:3]) or 'extra experts'})")
        out[f"layers.{i}.mlp.experts.w_gate_up_ED2F"] = torch.stack(
            [torch.cat((p["gate"], p["up"]), dim=0).T for p in parts])  # E x [D, 2F]
        out[f"layers.{i}.mlp.experts.w_down_EFD"] = torch.stack([p["down"].T for p in parts])  # E x [F, D]
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in out.items()}
