"""Hugging Face ``config.json`` -> our ``ModelConfig`` (what ``moe import`` and ``moe generate`` read).

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
    glm4_moe              sigmoid router (selection bias, groups, ``routed_scaling_factor``), ungated shared
                          experts, ``first_k_dense_replace``, optional qk_norm, q/k/v biases -> router ``sigmoid``
    dots1                 glm4_moe's MoE with qk_norm always and biases on all four projections
    phimoe                LayerNorm (``norm: layernorm``), SparseMixer top-2 routing -> router ``grin``
    moe_train             our own remote-code export: its ``config.json`` carries our model config as it is

and refuses, with one line naming what is supported: DeepSeek-V2/V3 (Multi-head Latent Attention, which our
model does not have), any other ``model_type``, a sliding window that is in use, RoPE scaling (only the plain
``default`` RoPE is implemented), partial rotary embeddings (GLM-4.5's default), activations other than SiLU,
MLP biases, PhiMoE's LM-head bias.
"""

from __future__ import annotations

from typing import Any

from moe.config import ModelConfig, MoEConfig, RouterConfig
from moe.config_io import from_dict

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "dots1",
                         "phimoe", "moe_train")
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
_QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
_SIGMOID_MOE = ("glm4_moe", "dots1")


def _field(raw: dict[str, Any], key: str, where: str, default: Any = ...) -> Any:
    if key in raw and raw[key] is not None:
        return raw[key]
    if default is ...:
        raise ValueError(f"{where}: config.json has no {key!r}")
    return default


def _rope_theta(raw: dict[str, Any], where: str, default: float, partial_default: float = 1.0) -> float:
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
    # GLM-4-MoE rotates half of each head unless told otherwise (its config's default partial_rotary_factor 0.5).
    partial = (params or {}).get("partial_rotary_factor", raw.get("partial_rotary_factor", partial_default))
    if partial != 1.0:
        raise ValueError(f"{where}: partial rotary embeddings are not supported (partial_rotary_factor {partial}); "
                         "supported: 1.0 (the rotary embedding over the whole head)")
    theta = (params or {}).get("rope_theta", raw.get("rope_theta"))
    return float(default if theta is None else theta)


def _sliding_window_in_use(raw: dict[str, Any], model_type: str, max_positions: int) -> int | None:
    """The window when some layer's attention is actually limited by it, else None."""
    layer_types = raw.get("layer_types")
    if model_type in _QWEN and not raw.get("use_sliding_window", False):
        return None
    if model_type == "dots1" and layer_types is None:  # Dots1Config: sliding from layer max_window_layers on
        first = raw.get("max_window_layers", raw.get("num_hidden_layers", 0))
        layer_types = ["sliding_attention" if i >= first else "full"
                       for i in range(int(raw.get("num_hidden_layers", 0)))]
    if (model_type in _QWEN or model_type == "dots1") and layer_types is not None \
            and "sliding_attention" not in layer_types:
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
        if raw.get("model_type") == "moe_train":
            return from_dict(ModelConfig, _field(raw, "moe_train", where), "moe_train")
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
    if mt == "phimoe" and raw.get("lm_head_bias"):
        raise ValueError(f"{where}: lm_head_bias is not supported (our LM head has no bias)")
    max_pos = int(_field(raw, "max_position_embeddings", where))
    window = _sliding_window_in_use(raw, mt, max_pos)
    if window is not None:
        raise ValueError(f"{where}: sliding-window attention (window {window} < max_position_embeddings {max_pos}) "
                         "is not supported; supported: full causal attention")
    hidden, heads = int(_field(raw, "hidden_size", where)), int(_field(raw, "num_attention_heads", where))
    head_dim = raw.get("head_dim")
    num_layers = int(_field(raw, "num_hidden_layers", where))
    bias = bool(raw.get("attention_bias", False))
    kw: dict[str, Any] = dict(
        vocab_size=int(_field(raw, "vocab_size", where)), hidden_size=hidden, num_layers=num_layers,
        num_heads=heads, num_kv_heads=int(_field(raw, "num_key_value_heads", where, heads)),
        head_dim=None if head_dim is None or head_dim * heads == hidden else int(head_dim),
        intermediate_size=int(_field(raw, "intermediate_size", where)), max_position_embeddings=max_pos,
        rope_theta=_rope_theta(raw, where, 1e6 if mt in ("mixtral", "phimoe") else 10000.0,
                               0.5 if mt == "glm4_moe" else 1.0),
        rms_norm_eps=float(_field(raw, "rms_norm_eps", where, 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        initializer_range=float(raw.get("initializer_range", 0.02)),
        attention_bias=bias and mt in ("llama", "qwen3", "qwen3_moe", "dots1", "phimoe"),
        qkv_bias=(mt == "qwen2" or (mt == "qwen2_moe" and bool(raw.get("qkv_bias", True)))
                  or (mt == "glm4_moe" and bias)),
        qk_norm=mt in ("qwen3", "qwen3_moe", "dots1") or (mt == "glm4_moe" and bool(raw.get("use_qk_norm", False))),
        norm="layernorm" if mt == "phimoe" else "rmsnorm",
        moe=None,
    )
    # Training-only: HF's load-balancing loss counts each token once per chosen expert (docs/routers.md#load-balancing).
    router = dict(aux_loss_coef=float(raw.get("router_aux_loss_coef", 0.001)), lb_f_normalization="tokens")
    if mt == "mixtral":
        kw["moe"] = MoEConfig(
            num_experts=int(raw.get("num_local_experts") or _field(raw, "num_experts", where)),
            expert_hidden_size=kw["intermediate_size"],
            router=RouterConfig(top_k=int(_field(raw, "num_experts_per_tok", where)), renormalize=True, **router))
    elif mt == "phimoe":
        kw["moe"] = _phimoe(raw, where, kw["intermediate_size"], router["aux_loss_coef"])
    elif mt in _SIGMOID_MOE:
        kw["moe"] = _sigmoid_moe(raw, where, num_layers)
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


def _phimoe(raw: dict[str, Any], where: str, width: int, aux_loss_coef: float) -> MoEConfig:
    """PhiMoE routes with SparseMixer-v2, always two steps (transformers' ``sparsemixer`` ignores the count)."""
    k = int(_field(raw, "num_experts_per_tok", where, 2))
    if k != 2:
        raise ValueError(f"{where}: num_experts_per_tok={k}, but PhiMoE's SparseMixer always routes to 2 experts")
    eps = float(_field(raw, "router_jitter_noise", where, 0.01))
    return MoEConfig(num_experts=int(_field(raw, "num_local_experts", where)), expert_hidden_size=width,
                     router=RouterConfig(name="grin", top_k=2, jitter_eps=eps, aux_loss_coef=aux_loss_coef))


def _sigmoid_moe(raw: dict[str, Any], where: str, num_layers: int) -> MoEConfig | None:
    """GLM-4-MoE / dots.llm1: DeepSeek-V3 routing (a selection bias always present) and ungated shared experts."""
    first = int(raw.get("first_k_dense_replace") or 0)
    if first >= num_layers:
        return None
    F = int(_field(raw, "moe_intermediate_size", where))
    shared = int(raw.get("n_shared_experts") or 0)
    options = dict(route_scale=float(raw.get("routed_scaling_factor", 1.0)), n_groups=int(raw.get("n_group") or 1),
                   topk_groups=int(raw.get("topk_group") or 1), loss_free_bias=True)
    return MoEConfig(
        num_experts=int(_field(raw, "n_routed_experts", where)), expert_hidden_size=F,
        router=RouterConfig(name="sigmoid", top_k=int(_field(raw, "num_experts_per_tok", where)),
                            renormalize=bool(raw.get("norm_topk_prob", raw.get("model_type") == "glm4_moe")),
                            options=options),
        first_dense_layers=first, num_shared_experts=shared, shared_expert_hidden_size=None)
