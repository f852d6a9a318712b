"""Hugging Face ``config.json`` <-> our ``ModelConfig``, and which native layout a model can be exported as.

Shape legend: L layers, D model width, E experts, F expert hidden width, H heads, Hd head width.

Import reads these ``model_type`` values (``SUPPORTED_MODEL_TYPES``):

    llama, mistral        dense, no biases (Llama: ``attention_bias`` on q/k/v/o); Mistral's sliding window only
                          when it cannot take effect (window >= max_position_embeddings)
    qwen2                 dense, q/k/v biases without an o bias                     -> ``qkv_bias``
    qwen3                 dense, per-head q/k RMSNorm                               -> ``qk_norm``
    mixtral               every layer MoE, top-k softmax renormalised over the k
    qwen2_moe             + sigmoid-gated shared expert, ``decoder_sparse_step`` / ``mlp_only_layers``,
                          ``norm_topk_prob``                                        -> ``moe.shared_expert_gate``
    qwen3_moe             qwen3 attention + qwen2_moe's routing without the shared expert

and refuses, with one line naming what is supported: DeepSeek-V2/V3 (Multi-head Latent Attention, which our
model does not have), any other ``model_type``, a sliding window that is in use, RoPE scaling (only the plain
``default`` RoPE is implemented), activations other than SiLU, MLP biases, partial rotary.

Export (``export_layout``) picks the first native layout that expresses the model exactly:

    dense:  llama (no biases or biases on all four projections) | qwen2 (q/k/v biases only) | qwen3 (qk_norm)
    MoE, router ``topk``, dropless at inference (``eval_capacity_factor: null``):
        mixtral    every layer MoE, ``renormalize: true``, no shared experts, no attention biases, no qk_norm
        qwen3_moe  qk_norm (Qwen3-MoE always has it), no shared experts; ``renormalize`` -> ``norm_topk_prob``;
                   any ``first_dense_layers`` / ``moe_every`` pattern (written as ``mlp_only_layers``)
        qwen2_moe  everything else without qk_norm and without an o bias: shared experts (gated as is; ungated
                   as a zero gate, sigmoid(0) = 1/2, with the shared down projection doubled — exact in floating
                   point), no shared experts (a width-1 shared expert of zeros, which adds exactly 0),
                   ``renormalize: false``, dense layers, q/k/v biases (``qkv_bias``)

Routers: only ``topk`` has a native layout (Mixtral / Qwen2-MoE / Qwen3-MoE route with softmax -> top-k ->
optional renormalisation, per token). The others are refused: ``sigmoid`` (DeepSeek-V3 scoring: its only native
layout, deepseek_v3, needs MLA attention), ``expert_choice`` (experts pick tokens: not causal, not per-token),
``hash`` (routes by token id, no HF layout routes without a learned gate), ``adaptive`` / ``top_p`` (a variable
number of experts per token), ``grin`` (SparseMixer sampling; at inference a top-2 whose second choice masks the
first: no native layout), ``switch`` / ``gshard`` (top-1 / top-2 with capacity: the dropless eval form is a
top-k that could map to Qwen2-MoE once a parity test proves it; until then refused). Training-only settings
(aux/z-loss coefficients, jitter, the training ``capacity_factor``) do not block export.
"""

from __future__ import annotations

from typing import Any

from moe.config import ModelConfig, MoEConfig, RouterConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
EXPORT_LAYOUTS = ("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
_QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


def _field(raw: dict[str, Any], key: str, where: str, default: Any = ...) -> Any:
    if key in raw and raw[key] is not None:
        return raw[key]
    if default is ...:
        raise ValueError(f"{where}: config.json has no {key!r}")
    return default


def _rope_theta(raw: dict[str, Any], where: str, default: float) -> float:
    """The RoPE base, refusing every RoPE variant but the plain one (v5 ``rope_parameters`` or v4 keys)."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    for block in (params, scaling):
        if block is None:
            continue
        if not isinstance(block, dict) or any(isinstance(v, dict) for v in block.values()):
            raise ValueError(f"{where}: per-layer RoPE parameters are not supported (only the default RoPE)")
        kind = block.get("rope_type", block.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{where}: RoPE scaling {kind!r} is not implemented; supported: default (no scaling)")
        if block.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: partial rotary embeddings are not supported (partial_rotary_factor "
                             f"{block['partial_rotary_factor']})")
    theta = (params or {}).get("rope_theta", raw.get("rope_theta"))
    return float(default if theta is None else theta)


def _sliding_window_in_use(raw: dict[str, Any], model_type: str, max_positions: int) -> int | None:
    """The window when some layer's attention is actually limited by it, else None."""
    if model_type in _QWEN:
        if not raw.get("use_sliding_window", False):
            return None
        layer_types = raw.get("layer_types")
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
    window = raw.get("sliding_window")
    if not window or window >= max_positions:  # None, or 0 (what Qwen2-MoE writes when it is off)
        return None
    return int(window)


def _layer_pattern(moe_layers: list[int], num_layers: int, where: str) -> tuple[int, int]:
    """``(first_dense_layers, moe_every)`` whose rule gives exactly ``moe_layers``."""
    first = moe_layers[0]
    every = moe_layers[1] - first if len(moe_layers) > 1 else max(num_layers - first, 1)
    if list(range(first, num_layers, every)) != moe_layers:
        raise ValueError(f"{where}: MoE layers {moe_layers} of {num_layers} do not follow one 'first_dense_layers, "
                         "then every moe_every-th layer' pattern, which is what our model expresses")
    return first, every


def model_config_from_hf(raw: dict[str, Any], where: str) -> ModelConfig:
    """Our ``ModelConfig`` for a Hugging Face ``config.json`` (as a dict); ``ValueError`` for what we cannot run."""
    try:
        return _model_config_from_hf(raw, where)
    except ValueError as e:  # our config's own checks (e.g. top_k > num_experts) get the file named too
        raise ValueError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    except (TypeError, AttributeError) as e:  # a field of the wrong JSON type
        raise ValueError(f"{where}: malformed config ({e})") from None


def _model_config_from_hf(raw: dict[str, Any], where: str) -> ModelConfig:
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    mt = raw.get("model_type")
    if mt in MLA_MODEL_TYPES:
        raise ValueError(f"{where}: model_type {mt!r} uses Multi-head Latent Attention (MLA), which this library's "
                         f"model does not have; supported model types: {supported}")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: unsupported model_type {mt!r}; supported model types: {supported}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported; supported: silu (SwiGLU)")
    if raw.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias is not supported (our feed-forwards have no biases)")
    max_pos = int(_field(raw, "max_position_embeddings", where))
    window = _sliding_window_in_use(raw, mt, max_pos)
    if window is not None:
        raise ValueError(f"{where}: sliding-window attention (window {window} < max_position_embeddings {max_pos}) "
                         "is not supported; supported: full causal attention")
    hidden, heads = int(_field(raw, "hidden_size", where)), int(_field(raw, "num_attention_heads", where))
    head_dim = raw.get("head_dim")
    num_layers = int(_field(raw, "num_hidden_layers", where))
    kw: dict[str, Any] = dict(
        vocab_size=int(_field(raw, "vocab_size", where)), hidden_size=hidden, num_layers=num_layers,
        num_heads=heads, num_kv_heads=int(_field(raw, "num_key_value_heads", where, heads)),
        head_dim=None if head_dim is None or head_dim * heads == hidden else int(head_dim),
        intermediate_size=int(_field(raw, "intermediate_size", where)), max_position_embeddings=max_pos,
        rope_theta=_rope_theta(raw, where, 1e6 if mt == "mixtral" else 10000.0),
        rms_norm_eps=float(_field(raw, "rms_norm_eps", where, 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        initializer_range=float(raw.get("initializer_range", 0.02)),
        attention_bias=bool(raw.get("attention_bias", False)) and mt in ("llama", "qwen3", "qwen3_moe"),
        qkv_bias=mt == "qwen2" or (mt == "qwen2_moe" and bool(raw.get("qkv_bias", True))),
        qk_norm=mt in ("qwen3", "qwen3_moe"),
        moe=None,
    )
    # Training-only: HF's load-balancing loss counts each token once per chosen expert (docs/routers.md#load-balancing).
    router = dict(aux_loss_coef=float(raw.get("router_aux_loss_coef", 0.001)), lb_f_normalization="tokens")
    if mt == "mixtral":
        kw["moe"] = MoEConfig(
            num_experts=int(raw.get("num_local_experts") or _field(raw, "num_experts", where)),
            expert_hidden_size=kw["intermediate_size"],
            router=RouterConfig(top_k=int(_field(raw, "num_experts_per_tok", where)), renormalize=True, **router))
    elif mt in ("qwen2_moe", "qwen3_moe"):
        # transformers 5 writes Qwen3-MoE's expert count as num_local_experts; the Hub's files say num_experts.
        E = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
        step = int(raw.get("decoder_sparse_step") or 1)
        dense_only = set(raw.get("mlp_only_layers") or [])
        moe_layers = [i for i in range(num_layers) if i not in dense_only and E > 0 and (i + 1) % step == 0]
        if moe_layers:
            first, every = _layer_pattern(moe_layers, num_layers, where)
            shared = int(raw.get("shared_expert_intermediate_size") or 0) if mt == "qwen2_moe" else 0
            kw["moe"] = MoEConfig(
                num_experts=E, expert_hidden_size=int(_field(raw, "moe_intermediate_size", where)),
                router=RouterConfig(top_k=int(_field(raw, "num_experts_per_tok", where)),
                                    renormalize=bool(raw.get("norm_topk_prob", False)), **router),
                first_dense_layers=first, moe_every=every, num_shared_experts=1 if shared else 0,
                shared_expert_hidden_size=shared or None, shared_expert_gate=bool(shared))
    return ModelConfig(**kw)


def _is_dense(cfg: ModelConfig) -> bool:
    return cfg.moe is None or not any(cfg.moe.is_moe_layer(i) for i in range(cfg.num_layers))


def export_layout(cfg: ModelConfig) -> str:
    """The native Hugging Face layout (a ``model_type``) that expresses ``cfg`` exactly; ``ValueError`` otherwise."""
    qkv_only = cfg.qkv_bias and not cfg.attention_bias
    if _is_dense(cfg):
        if cfg.qk_norm:
            if qkv_only:
                raise ValueError("cannot export: qk_norm with q/k/v biases but no o bias has no native layout (qwen3 "
                                 "has qk_norm with biases on all four projections or none; qwen2 has no qk_norm)")
            return "qwen3"
        return "qwen2" if qkv_only else "llama"
    m = cfg.moe
    assert m is not None
    layouts = "mixtral, qwen2_moe, qwen3_moe"
    if m.router.name != "topk":
        raise ValueError(f"cannot export: router {m.router.name!r} has no native Hugging Face layout; the MoE "
                         f"layouts ({layouts}) route with router 'topk' (softmax, top-k, optional renormalisation)")
    if m.router.options:
        raise ValueError(f"cannot export: router.options {sorted(m.router.options)} are not expressed by the native "
                         f"layouts ({layouts}); export needs the plain topk router")
    if m.eval_capacity_factor is not None:
        raise ValueError(f"cannot export: moe.eval_capacity_factor={m.eval_capacity_factor} drops tokens at inference "
                         f"and the native layouts ({layouts}) are dropless; set it to null")
    if cfg.qk_norm:
        if m.num_shared_experts:
            raise ValueError("cannot export: qk_norm with shared experts has no native layout (qwen3_moe has qk_norm "
                             "but no shared expert; qwen2_moe has a shared expert but no qk_norm)")
        if qkv_only:
            raise ValueError("cannot export: qk_norm with q/k/v biases but no o bias has no native layout "
                             "(qwen3_moe biases all four projections or none)")
        return "qwen3_moe"
    if cfg.attention_bias:
        raise ValueError("cannot export: an MoE model with an o-projection bias (attention_bias) but no qk_norm has no "
                         "native layout (mixtral has no biases, qwen2_moe biases q/k/v only, qwen3_moe needs qk_norm)")
    all_moe = all(m.is_moe_layer(i) for i in range(cfg.num_layers))
    if all_moe and m.router.renormalize and not m.num_shared_experts and not cfg.qkv_bias:
        return "mixtral"
    return "qwen2_moe"


def hf_config_dict(cfg: ModelConfig, layout: str, dtype: str) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` in ``layout`` (from ``export_layout``), weights stored as ``dtype``."""
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
    if layout in ("llama", "qwen3", "qwen3_moe"):
        out["attention_bias"] = cfg.attention_bias
    if layout == "llama":
        out["mlp_bias"] = False
    if layout in _QWEN or layout == "mixtral":
        out.update(use_sliding_window=False, sliding_window=None)
    if layout in ("qwen2", "qwen3", "qwen2_moe"):
        out["max_window_layers"] = cfg.num_layers
    if _is_dense(cfg):
        return out
    m = cfg.moe
    assert m is not None
    if layout == "mixtral":
        out.update(intermediate_size=m.expert_hidden_size, num_local_experts=m.num_experts,
                   num_experts_per_tok=m.router.top_k, router_jitter_noise=0.0,
                   router_aux_loss_coef=_aux_coef(m))
        return out
    dense_layers = [i for i in range(cfg.num_layers) if not m.is_moe_layer(i)]
    out.update(num_experts=m.num_experts, num_experts_per_tok=m.router.top_k,
               moe_intermediate_size=m.expert_hidden_size, norm_topk_prob=m.router.renormalize,
               decoder_sparse_step=1, mlp_only_layers=dense_layers, router_aux_loss_coef=_aux_coef(m))
    if layout == "qwen2_moe":
        # Qwen2-MoE always has a shared expert; a model without one gets a zero expert of width 1 (weights.py).
        out.update(shared_expert_intermediate_size=m.shared_hidden_size or 1, qkv_bias=cfg.qkv_bias)
    return out


def _aux_coef(m) -> float:
    """The load-balancing coefficient the model trained with (the topk router's default when unset)."""
    return 0.01 if m.router.aux_loss_coef is None else m.router.aux_loss_coef
