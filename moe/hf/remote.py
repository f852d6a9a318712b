"""The remote-code export: a folder that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
loads for any model of this library, with no import of this package.

The three files of ``moe/hf/remote_code/`` are copied beside the weights:

    configuration_moe_train.py   ``MoETrainConfig`` (``model_type: moe_train``)
    modeling_moe_train.py        ``MoETrainForCausalLM``: the decoder in eval mode, ``generate()`` with a KV cache
    routing_moe_train.py         every router's inference rule, on plain torch

``config.json`` names them in ``auto_map`` and carries our model config (``moe_train``, which ``moe import`` reads
back, router options spelled out in full) and the router's resolved inference settings (``moe_routing``, from
``moe.hf.router_view.routing_settings``). Weights keep our names under ``model.`` (``moe.hf.weights``).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from moe.config import ModelConfig
from moe.config_io import to_dict
from moe.hf.config_map import ARCHITECTURES, REMOTE
from moe.hf.router_view import options_resolved, routing_settings

CODE_DIR = Path(__file__).parent / "remote_code"
CODE_FILES = ("configuration_moe_train.py", "modeling_moe_train.py", "routing_moe_train.py")
AUTO_MAP = {"AutoConfig": "configuration_moe_train.MoETrainConfig",
            "AutoModelForCausalLM": "modeling_moe_train.MoETrainForCausalLM"}


def remote_config_dict(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """``config.json`` of the remote-code folder of ``cfg``, weights stored as ``dtype``."""
    saved = options_resolved(cfg)
    if saved.moe is not None and saved.moe.router.name == "hash":
        # The table is a weight of the folder; the counts file it was fitted from is a training input.
        options = dict(saved.moe.router.options, token_counts_path=None)
        saved = dataclasses.replace(saved, moe=dataclasses.replace(
            saved.moe, router=dataclasses.replace(saved.moe.router, options=options)))
    return dict(
        architectures=[ARCHITECTURES[REMOTE]], model_type=REMOTE, auto_map=dict(AUTO_MAP),
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.attention_head_dim,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, norm=cfg.norm, norm_eps=cfg.rms_norm_eps, attention_bias=cfg.attention_bias,
        qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm, tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range, use_cache=True, dtype=dtype, torch_dtype=dtype,
        moe_train=to_dict(saved), moe_routing=None if cfg.moe is None else routing_settings(cfg),
    )


def copy_remote_code(out: Path) -> list[str]:
    for name in CODE_FILES:
        shutil.copyfile(CODE_DIR / name, out / name)
    return list(CODE_FILES)


def check_runnable(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """``ValueError`` for router state that cannot run at inference (in any engine, ours included)."""
    m = cfg.moe
    if m is None:
        return
    for i in (i for i in range(cfg.num_layers) if m.is_moe_layer(i)):
        table = state.get(f"layers.{i}.mlp.router.table")
        if table is not None and bool((table < 0).any()):
            raise ValueError(f"cannot export: layer {i}'s balanced hash table was never fitted (set "
                             "router.options.token_counts_path when training, or call fit_balanced)")
        updates = state.get(f"layers.{i}.mlp.router.threshold_updates")
        if updates is not None and m.router.router_options().eval_routing == "threshold" and int(updates) == 0:
            raise ValueError(f"cannot export: layer {i}'s expert-choice thresholds were never estimated (they are "
                             "updated after each optimizer step: train the model first)")
