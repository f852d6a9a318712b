"""Export of our models to every native layout, checked against ``transformers`` itself.

For each layout: a tiny random model saved as a run directory -> ``export_hf`` -> ``from_pretrained`` (fp32):
logits equal ours (<= 1e-4; measured 0 for the dense layouts, <= 2e-6 for the MoE ones), greedy generation gives
the same tokens through ``moe.generate`` and transformers' ``generate``, and ``import_hf`` of the export gives back
bitwise-identical weights. Then the refusals: models no native layout expresses exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe.generate import generate, load_model
from moe.hf.config_map import export_layout
from moe.hf.export_hf import export_hf
from moe.hf.import_hf import import_hf
from moe.rundir import read_run
from tests.hf.helpers import VOCAB, hf_greedy, make_run, max_diff, tiny_config

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
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
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_export_matches_transformers_and_round_trips(case, tmp_path):
    layout, kw = LAYOUTS[case]
    cfg = tiny_config(**kw)
    ours, state = make_run(tmp_path / "run", cfg)
    # Training-only settings ride along without blocking export.
    assert export_layout(cfg) == layout
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert result.layout == layout
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == layout and config["eos_token_id"] is None

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                                 output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(hf).__name__ == config["architectures"][0]
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        diff = max_diff(ours(ids).logits, hf(input_ids=ids).logits)
    assert diff <= ATOL, f"{case}: max |ours - transformers| = {diff:.2e}"

    prompt = [3, 14, 15, 92, 65]
    ours_tokens = generate(load_model(tmp_path / "run"), prompt, 10, greedy=True)
    assert ours_tokens == hf_greedy(hf, prompt, 10)

    import_hf(tmp_path / "hf", tmp_path / "back")
    _, back = read_run(tmp_path / "back")
    assert sorted(back) == sorted(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_export_keeps_bf16_and_tokenizer_files(tmp_path):
    cfg = tiny_config(moe={})
    _, state = make_run(tmp_path / "run", cfg)
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(tmp_path / "run" / "model.safetensors"))
    (tmp_path / "run" / "tokenizer.json").write_text("{}")
    (tmp_path / "run" / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert sorted(result.copied) == ["generation_config.json", "tokenizer.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["eos_token_id"] == 5
    import_hf(tmp_path / "hf", tmp_path / "back")
    _, back = read_run(tmp_path / "back")
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], v.to(torch.bfloat16)) for k, v in state.items())


REFUSED = {
    "router_switch": ({"moe": {}, "router": {"name": "switch", "top_k": 1, "renormalize": False}},
                      "router 'switch' has no native"),
    "router_sigmoid": ({"moe": {}, "router": {"name": "sigmoid"}}, "router 'sigmoid' has no native"),
    "router_top_p": ({"moe": {}, "router": {"name": "top_p"}}, "router 'top_p' has no native"),
    "eval_capacity": ({"moe": {"eval_capacity_factor": 2.0}}, "eval_capacity_factor=2.0 drops tokens"),
    "qk_norm_and_shared": ({"qk_norm": True, "moe": {"num_shared_experts": 1}}, "qk_norm with shared experts"),
    "moe_o_bias": ({"attention_bias": True, "moe": {}}, "o-projection bias"),
    "qk_norm_qkv_bias": ({"qk_norm": True, "qkv_bias": True}, "qk_norm with q/k/v biases"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_export_refuses_what_no_layout_expresses(case, tmp_path):
    kw, message = REFUSED[case]
    make_run(tmp_path / "run", tiny_config(**kw))
    with pytest.raises(ValueError, match="cannot export") as err:
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_training_only_settings_do_not_block_export():
    cfg = tiny_config(moe={"capacity_factor": 1.25}, router={"aux_loss_coef": 0.1, "z_loss_coef": 1e-3,
                                                             "jitter": "input_jitter"})
    assert export_layout(cfg) == "mixtral"
