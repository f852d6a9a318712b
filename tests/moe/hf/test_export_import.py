"""Export of our models to every native layout, checked against ``transformers`` itself.

For each layout: a tiny random model with a trained BPE tokenizer, saved as a run directory -> ``export_hf`` ->
``from_pretrained`` (fp32): logits equal ours (<= 1e-5; measured <= 2e-6), greedy generation gives the same tokens
through ``moe.generate`` and transformers' ``generate`` (both stopping at the exported eos), ``AutoTokenizer``
tokenises as training did, and ``import_hf`` of the export gives back bitwise-identical weights. Every router whose
inference form a native layout has is here: topk, switch, gshard (Qwen2/3-MoE, Mixtral), sigmoid (GLM-4-MoE,
dots.llm1), grin (PhiMoE, with ``norm: layernorm``).
"""

from __future__ import annotations

import json

import pytest
import torch

from moe.hf.config_map import export_layout
from moe.hf.export_hf import export_hf
from moe.hf.import_hf import import_hf
from moe.rundir import read_run
from tests.moe.hf.helpers import TOK_VOCAB, check_export_in_transformers, make_run, tiny_config


ATOL = 1e-5
SIGMOID = {"name": "sigmoid", "options": {"n_groups": 2, "topk_groups": 1, "route_scale": 1.7}}
# name: (expected layout, tiny_config kwargs)
LAYOUTS = {
    "llama": ("llama", {}),
    "llama_bias_tied_mha": ("llama", {"attention_bias": True, "tie_word_embeddings": True, "num_kv_heads": 4}),
    "qwen2": ("qwen2", {"qkv_bias": True, "tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"qk_norm": True, "head_dim": 12}),  # head_dim != hidden / heads
    "mixtral": ("mixtral", {"moe": {}}),
    "qwen3_moe": ("qwen3_moe", {"qk_norm": True, "moe": {"first_dense_layers": 1}, "router": {"renormalize": False}}),
    "qwen3_moe_bias": ("qwen3_moe", {"qk_norm": True, "attention_bias": True, "moe": {}}),
    "qwen2_moe_gated": ("qwen2_moe", {"qkv_bias": True, "head_dim": 12,
                                      "moe": {"num_shared_experts": 1, "shared_expert_gate": True, "moe_every": 2}}),
    "qwen2_moe_ungated": ("qwen2_moe", {"moe": {"num_shared_experts": 2}}),
    "qwen2_moe_no_shared": ("qwen2_moe", {"moe": {}, "router": {"top_k": 1, "renormalize": False}}),
    "qwen2_moe_dense_first": ("qwen2_moe", {"moe": {"first_dense_layers": 1}}),
    # switch and gshard: their dropless inference form is a softmax top-k.
    "switch_qwen2_moe": ("qwen2_moe", {"moe": {"capacity_factor": 1.25},
                                       "router": {"name": "switch", "top_k": 1, "renormalize": False}}),
    "switch_qwen3_moe": ("qwen3_moe", {"qk_norm": True, "moe": {},
                                       "router": {"name": "switch", "top_k": 1, "renormalize": False}}),
    "gshard_mixtral": ("mixtral", {"moe": {"capacity_factor": 1.25}, "router": {"name": "gshard"}}),
    "gshard_unnormalized_qwen2_moe": ("qwen2_moe", {"qkv_bias": True, "moe": {}, "router": {
        "name": "gshard", "options": {"normalize_before_policy": False}}}),
    "gshard_top1_qwen3_moe": ("qwen3_moe", {"qk_norm": True, "moe": {}, "router": {"name": "gshard", "options": {
        "second_policy_eval": "none", "normalize_before_policy": False}}}),
    # sigmoid: selection bias, group limit, route_scale, (no) renormalisation, shared experts, dense layers.
    "sigmoid_glm4_moe": ("glm4_moe", {"moe": {"first_dense_layers": 1, "num_shared_experts": 1,
                                              "shared_expert_hidden_size": 20}, "router": SIGMOID}),
    "sigmoid_glm4_moe_qk_norm_qkv_bias_tied": ("glm4_moe", {
        "qk_norm": True, "qkv_bias": True, "tie_word_embeddings": True, "moe": {"num_shared_experts": 2},
        "router": {"name": "sigmoid", "renormalize": False, "top_k": 3}}),
    "sigmoid_glm4_moe_no_shared": ("glm4_moe", {"moe": {}, "router": {"name": "sigmoid", "options": {
        "loss_free_bias": False}}}),
    "sigmoid_dots1": ("dots1", {"qk_norm": True, "attention_bias": True, "moe": {"num_shared_experts": 1},
                                "router": SIGMOID}),
    # grin: PhiMoE's SparseMixer routing with its LayerNorm.
    "grin_phimoe": ("phimoe", {"norm": "layernorm", "moe": {}, "router": {"name": "grin", "jitter_eps": 0.2}}),
    "grin_phimoe_bias_tied": ("phimoe", {"norm": "layernorm", "attention_bias": True, "tie_word_embeddings": True,
                                         "moe": {}, "router": {"name": "grin", "aux_loss_coef": 0.01}}),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_export_matches_transformers_and_round_trips(case, tmp_path):
    layout, kw = LAYOUTS[case]
    cfg = tiny_config(vocab_size=TOK_VOCAB, **kw)
    ours, state = make_run(tmp_path / "run", cfg)
    assert export_layout(cfg) == layout  # training-only settings ride along without blocking export
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert result.layout == layout and result.why_remote is None
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == layout and config["eos_token_id"] == 0  # the BPE's <|endoftext|>

    hf = check_export_in_transformers(case, ours, tmp_path / "run", tmp_path / "hf", atol=ATOL)
    assert type(hf).__name__ == config["architectures"][0]

    import_hf(tmp_path / "hf", tmp_path / "back")
    _, back = read_run(tmp_path / "back")
    if case == "sigmoid_glm4_moe_no_shared":  # glm4_moe always has the selection bias: a router without one gets 0
        for name in [k for k in back if k.endswith("e_score_correction_bias")]:
            assert not back.pop(name).any()
    assert sorted(back) == sorted(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_export_keeps_bf16_and_the_runs_own_side_files(tmp_path):
    cfg = tiny_config(moe={}, router={"name": "sigmoid"})
    _, state = make_run(tmp_path / "run", cfg)
    from safetensors.torch import save_file

    # A bf16 model keeps the sigmoid router's selection bias in fp32 (moe.routing.sigmoid), and so does the export.
    save_file({k: v if k.endswith("correction_bias") else v.to(torch.bfloat16) for k, v in state.items()},
              str(tmp_path / "run" / "model.safetensors"))
    (tmp_path / "run" / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert result.layout == "glm4_moe"
    assert sorted(result.copied) == ["generation_config.json"]  # no tokenizer (V < 256): none is made up
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["eos_token_id"] == 5
    import_hf(tmp_path / "hf", tmp_path / "back")
    _, back = read_run(tmp_path / "back")
    for k, v in state.items():
        want = v if k.endswith("correction_bias") else v.to(torch.bfloat16)
        assert back[k].dtype == want.dtype and torch.equal(back[k], want), k


def test_training_only_settings_do_not_block_native_layouts():
    cfg = tiny_config(moe={"capacity_factor": 1.25}, router={"aux_loss_coef": 0.1, "z_loss_coef": 1e-3,
                                                             "jitter": "input_jitter"})
    assert export_layout(cfg) == "mixtral"
    cfg = tiny_config(moe={"capacity_factor": 1.0}, router={"name": "sigmoid", "jitter": "gumbel", "options": {
        "bias_update_rate": 0.1, "seq_aux_loss_coef": 0.01}})
    assert export_layout(cfg) == "glm4_moe"
