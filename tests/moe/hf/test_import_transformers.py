"""Import of models that ``transformers`` itself created and saved: our logits equal theirs (fp32, <= 1e-4).

Every family is saved with ``save_pretrained`` in small shards (``model.safetensors.index.json``, per-expert
tensor names as on the Hub); one Llama as a pickled ``pytorch_model.bin`` (read with ``weights_only=True``), and
one Mixtral as transformers 5's in-memory fused expert tensors, to cover the other reading paths.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe.hf.import_hf import import_hf
from moe.rundir import load_run_model
from tests.moe.hf.helpers import VOCAB, max_diff, randomize_

import transformers  # a test dependency: a missing one fails, it does not skip

ATOL = 1e-4
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 2000.0})
MOE = dict(num_experts_per_tok=2, router_jitter_noise=0.0)
# name: (config class, model class, extra config kwargs, what our config must say)
FAMILIES = {
    "llama_bias_tied": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "tie_word_embeddings": True},
                        {"attention_bias": True, "tie_word_embeddings": True}),
    "mistral_window_unused": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64}, {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, {"qkv_bias": True, "attention_bias": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 12}, {"qk_norm": True, "head_dim": 12}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, **MOE}, {"moe.num_experts": 4}),
    "qwen2_moe_dense_first": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                              {"num_experts": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 20,
                               "mlp_only_layers": [0], **MOE},
                              {"moe.first_dense_layers": 1, "moe.shared_expert_gate": True, "qkv_bias": True}),
    "qwen2_moe_sparse_step": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                              {"num_experts": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 20,
                               "decoder_sparse_step": 2, "norm_topk_prob": True, **MOE},
                              {"moe.first_dense_layers": 1, "moe.moe_every": 2, "moe.router.renormalize": True}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 4, "moe_intermediate_size": 16, "norm_topk_prob": True, **MOE},
                  {"qk_norm": True, "moe.num_shared_experts": 0, "moe.router.renormalize": True}),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 {"n_routed_experts": 4, "n_shared_experts": 1, "moe_intermediate_size": 16, "num_experts_per_tok": 2,
                  "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5,
                  "use_qk_norm": True, "attention_bias": True, "num_nextn_predict_layers": 0,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 2000.0, "partial_rotary_factor": 1.0}},
                 {"moe.router.name": "sigmoid", "moe.first_dense_layers": 1, "moe.num_shared_experts": 1,
                  "qk_norm": True, "qkv_bias": True, "attention_bias": False, "moe.router.renormalize": True}),
    "dots1": ("Dots1Config", "Dots1ForCausalLM",
              {"n_routed_experts": 4, "n_shared_experts": 2, "moe_intermediate_size": 16, "num_experts_per_tok": 2,
               "first_k_dense_replace": 2, "attention_bias": True, "norm_topk_prob": False, "sliding_window": None},
              {"moe.router.name": "sigmoid", "moe.first_dense_layers": 2, "moe.shared_hidden_size": 32,
               "qk_norm": True, "attention_bias": True, "moe.router.renormalize": False}),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", {"num_local_experts": 4, "attention_bias": True, **MOE},
               {"norm": "layernorm", "moe.router.name": "grin", "moe.router.top_k": 2, "attention_bias": True}),
}


def _hf_model(family: str):
    cfg_cls, model_cls, extra, _ = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
    return randomize_(getattr(transformers, model_cls)(cfg)).float().eval()


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _compare(hf, run_dir) -> float:
    ours = load_run_model(run_dir)
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        return max_diff(ours(ids).logits, hf(input_ids=ids).logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_reproduces_transformers_logits(family, tmp_path):
    hf = _hf_model(family)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # sharded
    result = import_hf(tmp_path / "hf", tmp_path / "run")
    for key, value in FAMILIES[family][3].items():
        assert _get(result.config, key) == value, key
    assert "generation_config.json" in result.copied
    diff = _compare(hf, tmp_path / "run")
    assert diff <= ATOL, f"{family}: max |ours - transformers| = {diff:.2e}"


def test_import_pickled_bin_with_weights_only(tmp_path):
    hf = _hf_model("llama_bias_tied")
    hf.config.save_pretrained(tmp_path / "hf")
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    import_hf(tmp_path / "hf", tmp_path / "run")
    assert _compare(hf, tmp_path / "run") <= ATOL


def test_import_fused_expert_tensors(tmp_path):
    """transformers 5's in-memory names (``mlp.experts.gate_up_proj``), sharded by hand."""
    from safetensors.torch import save_file

    hf = _hf_model("mixtral")
    hf.config.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    names = sorted(state)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / "hf" / file))
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    import_hf(tmp_path / "hf", tmp_path / "run")
    assert _compare(hf, tmp_path / "run") <= ATOL


def test_import_glm4_moe_skips_its_multi_token_prediction_layer(tmp_path):
    """GLM-4.5 checkpoints hold a next-token-prediction layer after the last one (``num_nextn_predict_layers``),
    which inference does not run: import leaves it out, as transformers does."""
    from safetensors.torch import save_file

    hf = _hf_model("glm4_moe")
    hf.config.num_nextn_predict_layers = 1
    hf.save_pretrained(tmp_path / "hf")
    L, D = hf.config.num_hidden_layers, hf.config.hidden_size
    save_file({f"model.layers.{L}.eh_proj.weight": torch.randn(D, 2 * D),
               f"model.layers.{L}.enorm.weight": torch.ones(D)}, str(tmp_path / "hf" / "mtp.safetensors"))
    index = {"weight_map": {**{k: "model.safetensors" for k in hf.state_dict()},
                            f"model.layers.{L}.eh_proj.weight": "mtp.safetensors",
                            f"model.layers.{L}.enorm.weight": "mtp.safetensors"}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    import_hf(tmp_path / "hf", tmp_path / "run")
    assert _compare(hf, tmp_path / "run") <= ATOL
