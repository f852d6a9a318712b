"""Models for the GGUF tests: each llama.cpp architecture and setting that export picks, and the refusals."""

from __future__ import annotations

SIGMOID = {"name": "sigmoid", "options": {"n_groups": 2, "topk_groups": 1, "route_scale": 1.7}}

# name: (llama.cpp architecture, tiny_config kwargs). Vocabulary TOK_VOCAB with the trained BPE unless given.
GGUF_CASES = {
    "dense_llama_biases_tied": ("llama", {"attention_bias": True, "tie_word_embeddings": True}),
    "dense_llama_qkv_bias_bytes": ("llama", {"qkv_bias": True, "vocab_size": 260}),  # no tokenizer.json: bytes
    "dense_qwen3": ("qwen3", {"qk_norm": True, "head_dim": 12}),
    "topk_mixtral": ("llama", {"moe": {}}),
    "gshard_mixtral_o_bias": ("llama", {"attention_bias": True, "moe": {"capacity_factor": 1.25},
                                        "router": {"name": "gshard"}}),
    "topk_qwen3moe_qkv_bias": ("qwen3moe", {"qk_norm": True, "qkv_bias": True, "moe": {}}),
    "topk_qwen2moe_gated_tied": ("qwen2moe", {"tie_word_embeddings": True, "router": {"renormalize": False},
                                              "moe": {"num_shared_experts": 1, "shared_expert_gate": True}}),
    "topk_glm4moe_ungated_dense_first": ("glm4moe", {"qkv_bias": True, "moe": {
        "first_dense_layers": 1, "num_shared_experts": 1, "shared_expert_hidden_size": 20}}),
    "topk_glm4moe_no_renorm": ("glm4moe", {"moe": {}, "router": {"renormalize": False, "top_k": 3}}),
    "switch_glm4moe": ("glm4moe", {"moe": {}, "router": {"name": "switch", "top_k": 1, "renormalize": False}}),
    "sigmoid_glm4moe_groups_qk_norm": ("glm4moe", {"qk_norm": True, "tie_word_embeddings": True, "router": SIGMOID,
                                                   "moe": {"first_dense_layers": 1, "num_shared_experts": 2}}),
    "sigmoid_glm4moe_no_bias_no_renorm": ("glm4moe", {"moe": {}, "router": {
        "name": "sigmoid", "renormalize": False, "options": {"loss_free_bias": False}}}),
}

# name: (tiny_config kwargs, what the one-line refusal names)
GGUF_REFUSED = {
    "grin": ({"norm": "layernorm", "moe": {}, "router": {"name": "grin"}}, "LayerNorm"),
    "grin_rmsnorm": ({"moe": {}, "router": {"name": "grin"}}, "SparseMixer"),
    "layernorm_dense": ({"norm": "layernorm"}, "LayerNorm"),
    "hash": ({"moe": {}, "router": {"name": "hash"}}, "routes by token id"),
    "expert_choice": ({"moe": {}, "router": {"name": "expert_choice", "options": {"allow_causal_leak": True}}},
                      "experts choose"),
    "adaptive": ({"moe": {}, "router": {"name": "adaptive"}}, "varying number of experts"),
    "top_p": ({"moe": {}, "router": {"name": "top_p"}}, "varying number of experts"),
    "gshard_threshold": ({"moe": {}, "router": {"name": "gshard", "options": {"second_policy_eval": "threshold"}}},
                         "second_policy_eval='threshold'"),
    "gshard_random": ({"moe": {}, "router": {"name": "gshard", "options": {"second_policy_eval": "random"}}},
                      "at random"),
    "eval_capacity": ({"moe": {"eval_capacity_factor": 2.0}}, "dropless"),
    "interleaved_dense": ({"moe": {"moe_every": 2}, "router": {"renormalize": False}}, "leading_dense_block_count"),
    "glm_o_bias": ({"attention_bias": True, "moe": {"num_shared_experts": 1}}, "no o bias"),
    "gated_renormalized": ({"moe": {"num_shared_experts": 1, "shared_expert_gate": True}}, "never renormalises"),
    "gated_dense_layers": ({"moe": {"num_shared_experts": 1, "shared_expert_gate": True, "first_dense_layers": 1},
                            "router": {"renormalize": False}}, "MoE in every layer"),
    "sigmoid_gated": ({"moe": {"num_shared_experts": 1, "shared_expert_gate": True}, "router": {"name": "sigmoid"}},
                      "gated shared expert"),
    "sigmoid_groups_no_bias": ({"moe": {}, "router": {"name": "sigmoid", "options": {
        "n_groups": 2, "topk_groups": 1, "loss_free_bias": False}}}, "best two"),
    "qwen3_o_bias": ({"qk_norm": True, "attention_bias": True}, "qwen3 has no o bias"),
}
