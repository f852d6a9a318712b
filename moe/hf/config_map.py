"""Which layout a model is exported as, what no engine can express, and the native layouts' ``config.json``.

Shape legend: L layers, D model width, E experts, F expert hidden width, W shared-expert width.

``export_layout`` picks the first native ``transformers`` layout that expresses the model exactly; a model that
none expresses is exported as self-contained remote code (``REMOTE``, ``moe.hf.remote``), which expresses every
model of this library. The router's inference form is what matters (``moe.hf.router_view``): training-only
settings (noise, auxiliary losses, the training capacity factor, bias updates) never block a layout.

    dense:  llama (no biases or biases on all four projections) | qwen2 (q/k/v biases only) | qwen3 (qk_norm)
    softmax top-k at inference, dropless (routers topk, switch, gshard with second_policy_eval all / none):
        mixtral    every layer MoE, renormalised, no shared experts, no attention biases, no qk_norm
        qwen3_moe  qk_norm (Qwen3-MoE always has it), no shared experts; renormalisation -> ``norm_topk_prob``;
                   any ``first_dense_layers`` / ``moe_every`` pattern (written as ``mlp_only_layers``)
        qwen2_moe  everything else without qk_norm and without an o bias: shared experts (gated as is; ungated
                   as a zero gate, sigmoid(0) = 1/2, with the shared down projection doubled — exact in floating
                   point), no shared experts (a width-1 shared expert of zeros, which adds exactly 0),
                   no renormalisation, dense layers, q/k/v biases (``qkv_bias``)
    router sigmoid, dropless (DeepSeek-V3 scoring: selection bias, group limit, route_scale, renormalisation):
        glm4_moe   no o bias (q/k/v biases allowed), qk_norm optional, ungated shared experts (none: width 0;
                   a width that is not a multiple of F: padded with zero units, exact), dense layers only before
                   the MoE layers (``first_k_dense_replace``); a group limit only with the selection bias
                   (transformers scores a group by its best two experts, ours without the bias by its best one)
        dots1      the same with qk_norm and biases on all four projections
    router grin (SparseMixer-v2: at inference, masked-softmax argmax steps):
        phimoe     ``norm: layernorm``, top_k 2, every layer MoE, no shared experts, no qk_norm, biases on all
                   four projections or none
    everything else: remote code (``model_type: moe_train``).

Refused (``export_refusal``), because no engine can reproduce them: routers whose inference is random (gshard with
``second_policy_eval`` random or sampling). ``moe.hf.export_hf`` also refuses weights that cannot run: a balanced
hash table never fitted, expert-choice thresholds never estimated.
"""

from __future__ import annotations

from typing import Any

from moe.config import ModelConfig
from moe.hf.config_import import MLA_MODEL_TYPES, SUPPORTED_MODEL_TYPES, model_config_from_hf
from moe.hf.router_view import SigmoidTopK, sigmoid_topk, softmax_topk, stochastic_reason

__all__ = ["ARCHITECTURES", "EXPORT_LAYOUTS", "MLA_MODEL_TYPES", "REMOTE", "SUPPORTED_MODEL_TYPES", "NotNative",
           "export_layout", "export_notice", "export_refusal", "hf_config_dict", "model_config_from_hf",
           "native_layout"]

REMOTE = "moe_train"
EXPORT_LAYOUTS = ("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "dots1", "phimoe")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM", "dots1": "Dots1ForCausalLM",
                 "phimoe": "PhimoeForCausalLM", REMOTE: "MoETrainForCausalLM"}
_QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


class NotNative(ValueError):
    """Why no native layout expresses a model (it is exported as remote code instead)."""


def _is_dense(cfg: ModelConfig) -> bool:
    return cfg.moe is None or not any(cfg.moe.is_moe_layer(i) for i in range(cfg.num_layers))


def export_refusal(cfg: ModelConfig) -> str | None:
    """Why no engine can express ``cfg`` (``moe export`` refuses it), or None."""
    return None if _is_dense(cfg) else stochastic_reason(cfg.moe)


def export_notice(cfg: ModelConfig) -> str | None:
    """What a user should know before training ``cfg``: that it will export only as remote code (and why), or not
    at all; None when a native layout expresses it."""
    refusal = export_refusal(cfg)
    if refusal is not None:
        return f"this model cannot be exported for inference: {refusal}"
    try:
        native_layout(cfg)
    except NotNative as e:
        return (f"this model exports to transformers only as remote code (trust_remote_code=True), no native layout "
                f"expresses it: {e}")
    return None


def export_layout(cfg: ModelConfig) -> str:
    """The native layout of ``cfg``, else ``REMOTE``; ``ValueError`` for what no engine expresses."""
    refusal = export_refusal(cfg)
    if refusal is not None:
        raise ValueError(f"cannot export: {refusal}")
    try:
        return native_layout(cfg)
    except NotNative:
        return REMOTE


def native_layout(cfg: ModelConfig) -> str:
    """The native ``transformers`` layout (a ``model_type``) that expresses ``cfg`` exactly; ``NotNative`` naming
    why there is none otherwise."""
    qkv_only = cfg.qkv_bias and not cfg.attention_bias
    if _is_dense(cfg):
        if cfg.norm == "layernorm":
            raise NotNative("a dense model with LayerNorm has no native layout (llama, qwen2 and qwen3 use RMSNorm)")
        if cfg.qk_norm:
            if qkv_only:
                raise NotNative("qk_norm with q/k/v biases but no o bias has no native layout (qwen3 has qk_norm "
                                "with biases on all four projections or none; qwen2 has no qk_norm)")
            return "qwen3"
        return "qwen2" if qkv_only else "llama"
    m = cfg.moe
    assert m is not None
    if cfg.norm == "layernorm" or m.router.name == "grin":
        return _phimoe(cfg)
    view = softmax_topk(m)
    if view is not None:
        return _softmax_layout(cfg)
    sigmoid = sigmoid_topk(m)
    if sigmoid is not None:
        return _sigmoid_layout(cfg, sigmoid)
    if m.eval_capacity_factor is not None and m.router.name in ("topk", "switch", "gshard", "sigmoid"):
        raise NotNative(f"moe.eval_capacity_factor={m.eval_capacity_factor} drops tokens at inference and the native "
                        "layouts are dropless")
    name = m.router.name
    if name == "gshard":
        policy = m.router.router_options().second_policy_eval
        raise NotNative(f"router gshard keeps a second expert by a policy no native layout has (second_policy_eval="
                        f"{policy!r}{', normalize_before_policy' if policy == 'none' else ''})")
    raise NotNative({"expert_choice": "router expert_choice: experts choose their tokens, no native layout does",
                     "hash": "router hash routes by token id, no native layout routes without a learned gate",
                     }.get(name, f"router {name!r} gives a varying number of experts per token, no native layout "
                                 "does"))


def _phimoe(cfg: ModelConfig) -> str:
    m = cfg.moe
    assert m is not None
    why = None
    if m.router.name != "grin":
        why = f"LayerNorm with router {m.router.name!r} (phimoe, the MoE layout with LayerNorm, routes with grin)"
    elif cfg.norm != "layernorm":
        why = "router grin with RMSNorm (phimoe, the layout with SparseMixer routing, uses LayerNorm: model.norm)"
    elif m.router.top_k != 2:
        why = f"router grin with top_k {m.router.top_k} (phimoe's SparseMixer always routes to 2 experts)"
    elif not all(m.is_moe_layer(i) for i in range(cfg.num_layers)):
        why = "dense layers (phimoe has an MoE feed-forward in every layer)"
    elif m.num_shared_experts:
        why = "shared experts (phimoe has none)"
    elif cfg.qk_norm:
        why = "qk_norm (phimoe has none)"
    elif cfg.qkv_bias and not cfg.attention_bias:
        why = "q/k/v biases without an o bias (phimoe biases all four projections or none)"
    if why:
        raise NotNative(f"no native layout: {why}")
    return "phimoe"


def _softmax_layout(cfg: ModelConfig) -> str:
    m = cfg.moe
    assert m is not None
    view = softmax_topk(m)
    assert view is not None
    renormalize = view[1]
    qkv_only = cfg.qkv_bias and not cfg.attention_bias
    if cfg.qk_norm:
        if m.num_shared_experts:
            raise NotNative("qk_norm with shared experts has no native layout (qwen3_moe has qk_norm but no shared "
                            "expert; qwen2_moe has a shared expert but no qk_norm)")
        if qkv_only:
            raise NotNative("qk_norm with q/k/v biases but no o bias has no native layout (qwen3_moe biases all four "
                            "projections or none)")
        return "qwen3_moe"
    if cfg.attention_bias:
        raise NotNative("an MoE model with an o-projection bias (attention_bias) but no qk_norm has no native layout "
                        "(mixtral has no biases, qwen2_moe biases q/k/v only, qwen3_moe needs qk_norm)")
    all_moe = all(m.is_moe_layer(i) for i in range(cfg.num_layers))
    if all_moe and renormalize and not m.num_shared_experts and not cfg.qkv_bias:
        return "mixtral"
    return "qwen2_moe"


def _sigmoid_layout(cfg: ModelConfig, s: SigmoidTopK) -> str:
    m = cfg.moe
    assert m is not None
    moe_layers = [i for i in range(cfg.num_layers) if m.is_moe_layer(i)]
    why = None
    if m.shared_expert_gate:
        why = "a gated shared expert (glm4_moe and dots1 add their shared experts ungated)"
    elif s.groups_limit and not s.selection_bias:
        why = ("group-limited routing without the selection bias (ours scores a group by its best expert, "
               "glm4_moe and dots1 by its best two)")
    elif moe_layers != list(range(moe_layers[0], cfg.num_layers)):
        why = "dense layers between MoE layers (glm4_moe and dots1 have dense layers only before the first MoE layer)"
    elif cfg.attention_bias and not cfg.qk_norm:
        why = "an o-projection bias without qk_norm (glm4_moe has no o bias; dots1 has qk_norm)"
    if why:
        raise NotNative(f"router sigmoid with {why} has no native layout")
    return "dots1" if cfg.attention_bias else "glm4_moe"


def shared_units(cfg: ModelConfig) -> tuple[int, int]:
    """glm4_moe / dots1 shared experts: (n_shared_experts, padded width) with width = n · F >= ours."""
    m = cfg.moe
    assert m is not None
    n = -(-m.shared_hidden_size // m.expert_hidden_size)
    return n, n * m.expert_hidden_size


def hf_config_dict(cfg: ModelConfig, layout: str, dtype: str) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` in the native ``layout`` (from ``native_layout``), weights stored as ``dtype``."""
    out: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[layout]], model_type=layout, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.attention_head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        # Both spellings of the RoPE base: transformers 5 reads rope_parameters, older readers rope_theta.
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
        attention_dropout=0.0, use_cache=True, intermediate_size=cfg.intermediate_size,
        dtype=dtype, torch_dtype=dtype,  # transformers 5 reads dtype, older readers torch_dtype
    )
    if layout in ("llama", "qwen3", "qwen3_moe", "dots1", "phimoe"):
        out["attention_bias"] = cfg.attention_bias
    if layout == "glm4_moe":
        # GLM-4-MoE rotates half of each head unless told otherwise; q/k/v biases only (attention_bias is dots1).
        out["rope_parameters"]["partial_rotary_factor"] = 1.0
        out.update(partial_rotary_factor=1.0, attention_bias=cfg.qkv_bias, use_qk_norm=cfg.qk_norm,
                   num_nextn_predict_layers=0)
    if layout == "llama":
        out["mlp_bias"] = False
    if layout in _QWEN or layout in ("mixtral", "dots1", "phimoe"):
        out.update(use_sliding_window=False, sliding_window=None)
    if layout in ("qwen2", "qwen3", "qwen2_moe", "dots1"):
        out["max_window_layers"] = cfg.num_layers
    if _is_dense(cfg):
        return out
    m = cfg.moe
    assert m is not None
    aux = {"router_aux_loss_coef": _aux_coef(m)}
    if layout == "phimoe":
        out.update(intermediate_size=m.expert_hidden_size, num_local_experts=m.num_experts, num_experts_per_tok=2,
                   router_jitter_noise=m.router.jitter_eps, input_jitter_noise=0.0, lm_head_bias=False, **aux)
        return out
    if layout in ("glm4_moe", "dots1"):
        s = sigmoid_topk(m)
        assert s is not None
        n_shared, _ = shared_units(cfg)
        groups = (s.n_groups, s.topk_groups) if s.groups_limit else (1, 1)  # keeping every group is no limit
        out.update(n_routed_experts=m.num_experts, num_experts_per_tok=s.top_k,
                   moe_intermediate_size=m.expert_hidden_size,
                   n_shared_experts=n_shared, routed_scaling_factor=s.route_scale, n_group=groups[0],
                   topk_group=groups[1], norm_topk_prob=s.renormalize, first_k_dense_replace=m.first_dense_layers)
        return out
    view = softmax_topk(m)
    assert view is not None
    top_k, renormalize = view
    if layout == "mixtral":
        out.update(intermediate_size=m.expert_hidden_size, num_local_experts=m.num_experts, num_experts_per_tok=top_k,
                   router_jitter_noise=0.0, **aux)
        return out
    dense_layers = [i for i in range(cfg.num_layers) if not m.is_moe_layer(i)]
    out.update(num_experts=m.num_experts, num_experts_per_tok=top_k, moe_intermediate_size=m.expert_hidden_size,
               norm_topk_prob=renormalize, decoder_sparse_step=1, mlp_only_layers=dense_layers, **aux)
    if layout == "qwen2_moe":
        # Qwen2-MoE always has a shared expert; a model without one gets a zero expert of width 1 (weights.py).
        out.update(shared_expert_intermediate_size=m.shared_hidden_size or 1, qkv_bias=cfg.qkv_bias)
    return out


def _aux_coef(m) -> float:
    """The load-balancing coefficient the model trained with (the router's default when unset)."""
    if m.router.aux_loss_coef is not None:
        return m.router.aux_loss_coef
    return {"grin": 0.001, "sigmoid": 0.0}.get(m.router.name, 0.01)
