"""Which llama.cpp architecture expresses a model exactly, and what none does.

Shape legend: L layers, D model width, E experts, K experts per token, F expert hidden width, H heads, Hd head width.

llama.cpp's semantics, read from its sources (llama-cpp-python 0.3.36's vendored llama.cpp: ``src/models/*.cpp``,
the MoE block ``build_moe_ffn`` in ``src/llama-graph.cpp``):

    llama     RMSNorm; rotary embedding in the interleaved layout (q/k rows permuted from ours, rotate-half, as
              ``convert_hf_to_gguf.py`` does); q/k/v/o biases optional; MoE in every layer or none: softmax,
              top-K, always renormalised (Mixtral), no shared experts
    qwen3     dense, per-head q/k RMSNorm; q/k/v biases optional, no o bias
    qwen3moe  qk_norm, every layer MoE, softmax top-K always renormalised (whatever norm_topk_prob says), no shared
              expert, no o bias
    qwen2moe  every layer MoE, softmax top-K never renormalised, always a sigmoid-gated shared expert (the sigmoid
              computed as silu(x)/x: NaN where x = 0, so a gate is never written all-zero), q width = hidden size,
              no o bias, no qk_norm, the output layer never tied (written untied)
    glm4moe   softmax or sigmoid scores (``expert_gating_func``), a selection bias always (``exp_probs_b``, zeros
              for routers without one), a group limit scoring groups by their best two, ``expert_weights_norm``
              and ``expert_weights_scale``, ungated shared experts always (n·F units: ours padded with zero units,
              a zero expert of width F when there is none), dense layers only before the first MoE layer
              (``leading_dense_block_count``), qk_norm optional, q/k/v biases optional, no o bias
    phimoe    normalises with RMSNorm plus a bias (not PhiMoE's LayerNorm) and routes with a renormalised softmax
              top-2 (not SparseMixer): it expresses none of our models

The first that fits wins; ``gguf_arch`` raises ``ValueError("cannot export as GGUF: ...")`` naming what llama.cpp
cannot express. Every llama.cpp MoE is dropless and per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ModelConfig
from moe.hf.router_view import sigmoid_topk, softmax_topk, stochastic_reason


@dataclass(frozen=True)
class GGUFPlan:
    """What the GGUF file says: the architecture and the MoE hyper-parameters llama.cpp reads."""

    arch: str
    gating: str = "softmax"  # softmax | sigmoid (glm4moe's expert_gating_func)
    top_k: int = 0
    renormalize: bool = False  # glm4moe's expert_weights_norm; fixed by the others
    scale: float = 1.0  # expert_weights_scale
    groups: tuple[int, int] = (0, 0)  # (expert_group_count, expert_group_used_count); (0, 0): no limit
    leading_dense: int = 0


def _refuse(why: str) -> ValueError:
    return ValueError(f"cannot export as GGUF: {why}")


def gguf_plan(cfg: ModelConfig) -> GGUFPlan:
    """The llama.cpp architecture and settings that express ``cfg`` exactly (module docstring)."""
    o_bias = cfg.attention_bias
    if cfg.norm == "layernorm":
        raise _refuse("model.norm layernorm: llama.cpp has no architecture with LayerNorm for this decoder (its phimoe "
                      "normalises with RMSNorm plus a bias)")
    m = cfg.moe
    moe_layers = [] if m is None else [i for i in range(cfg.num_layers) if m.is_moe_layer(i)]
    if not moe_layers:
        if cfg.qk_norm:
            if o_bias:
                raise _refuse("qk_norm with an o-projection bias (llama.cpp's qwen3 has no o bias)")
            return GGUFPlan(arch="qwen3")
        return GGUFPlan(arch="llama")
    assert m is not None
    stochastic = stochastic_reason(m)
    if stochastic:
        raise _refuse(stochastic)
    if m.router.name == "grin":
        raise _refuse("router grin (SparseMixer-v2): llama.cpp's phimoe routes with a renormalised softmax top-2")
    if m.eval_capacity_factor is not None:
        raise _refuse(f"moe.eval_capacity_factor={m.eval_capacity_factor} drops tokens at inference; llama.cpp's MoE "
                      "is dropless")
    leading = moe_layers == list(range(moe_layers[0], cfg.num_layers))
    all_moe = len(moe_layers) == cfg.num_layers
    softmax, sigmoid = softmax_topk(m), sigmoid_topk(m)
    if softmax is not None:
        k, renormalize = softmax
        if m.shared_expert_gate:
            return _qwen2moe(cfg, k, renormalize, all_moe)
        if all_moe and renormalize and not m.num_shared_experts:
            if not cfg.qk_norm:
                return GGUFPlan(arch="llama", top_k=k, renormalize=True)
            if not o_bias:
                return GGUFPlan(arch="qwen3moe", top_k=k, renormalize=True)
        return _glm4moe(cfg, moe_layers, leading, GGUFPlan(arch="glm4moe", top_k=k, renormalize=renormalize))
    if sigmoid is not None:
        if m.shared_expert_gate:
            raise _refuse("router sigmoid with a gated shared expert (llama.cpp's glm4moe adds shared experts ungated)")
        if sigmoid.groups_limit and not sigmoid.selection_bias:
            raise _refuse("group-limited routing without the selection bias (ours scores a group by its best expert, "
                          "llama.cpp by its best two)")
        groups = (sigmoid.n_groups, sigmoid.topk_groups) if sigmoid.groups_limit else (0, 0)
        return _glm4moe(cfg, moe_layers, leading, GGUFPlan(
            arch="glm4moe", gating="sigmoid", top_k=sigmoid.top_k, renormalize=sigmoid.renormalize,
            scale=sigmoid.route_scale, groups=groups))
    name = m.router.name
    if name == "gshard":
        policy = m.router.router_options().second_policy_eval
        raise _refuse(f"router gshard with second_policy_eval={policy!r} (llama.cpp keeps every one of the top-K "
                      "experts at its softmax weight)")
    raise _refuse({"expert_choice": "router expert_choice (experts choose their tokens; llama.cpp's MoE is token "
                                    "choice)",
                   "hash": "router hash (it routes by token id; llama.cpp's MoE routes with a learned gate)",
                   }.get(name, f"router {name!r} gives a varying number of experts per token (llama.cpp routes every "
                               "token to the same number)"))


def _qwen2moe(cfg: ModelConfig, k: int, renormalize: bool, all_moe: bool) -> GGUFPlan:
    why = None
    if renormalize:
        why = "renormalised top-k weights (llama.cpp's qwen2moe, its only gated shared expert, never renormalises)"
    elif not all_moe:
        why = "dense layers (llama.cpp's qwen2moe, its only gated shared expert, has MoE in every layer)"
    elif cfg.qk_norm or cfg.attention_bias:
        why = "qk_norm or an o-projection bias (llama.cpp's qwen2moe, its only gated shared expert, has neither)"
    elif cfg.attention_head_dim * cfg.num_heads != cfg.hidden_size:
        why = "head_dim x num_heads != hidden_size (llama.cpp's qwen2moe sizes queries by the hidden size)"
    if why:
        raise _refuse(f"a gated shared expert with {why}")
    return GGUFPlan(arch="qwen2moe", top_k=k, renormalize=False)


def _glm4moe(cfg: ModelConfig, moe_layers: list[int], leading: bool, plan: GGUFPlan) -> GGUFPlan:
    if not leading:
        raise _refuse(f"MoE layers {moe_layers} of {cfg.num_layers} (llama.cpp has dense layers only before the first "
                      "MoE layer: leading_dense_block_count)")
    if cfg.attention_bias:
        raise _refuse("an o-projection bias with this MoE (llama.cpp's glm4moe, the architecture for it, has no "
                      "o bias)")
    return GGUFPlan(**{**plan.__dict__, "leading_dense": moe_layers[0]})


def gguf_arch(cfg: ModelConfig) -> str:
    return gguf_plan(cfg).arch
