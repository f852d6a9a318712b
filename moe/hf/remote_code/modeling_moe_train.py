"""A moe-train decoder (Llama/Mixtral family, any moe-train router) as ``transformers`` remote code.

Shape legend: B batch, S new tokens, P cached positions, D model width, H query heads, G key/value heads,
Hd head width, T = B·S tokens, E experts, F expert hidden width, A assignments, V vocabulary.

Written by ``moe export`` into a model folder; loaded with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; ``generate()`` runs with a KV cache.
It needs torch and transformers only. The maths is moe-train's in ``eval()`` mode: RMSNorm (or LayerNorm) in
fp32, rotary embedding (rotate-half layout), grouped-query attention, SwiGLU experts whose weighted outputs are
summed in fp32, and the router's inference rule (``routing_moe_train.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_moe_train import MoETrainConfig
from .routing_moe_train import LOGIT_ROUTERS, route_expert_choice, route_hash, route_sigmoid

# transformers 5 renamed the cache field of model outputs from ``past_key_values`` to ``cache``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: MoETrainConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return RMSNorm(config.hidden_size, config.norm_eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin of the rotary embedding (RoFormer). The frequencies are computed in each call, not kept in a
    buffer: transformers re-creates non-persistent buffers when it loads a model, differently across versions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, position_ids_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=position_ids_BS.device).float()
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        freqs = position_ids_BS.float()[..., None] * inv_freq  # (B, S, Hd/2)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, S, Hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: MoETrainConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        D, H, G, Hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, Hd
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(D, H * Hd, bias=qkv_bias)
        self.k_proj = nn.Linear(D, G * Hd, bias=qkv_bias)
        self.v_proj = nn.Linear(D, G * Hd, bias=qkv_bias)
        self.o_proj = nn.Linear(H * Hd, D, bias=config.attention_bias)
        self.q_norm = RMSNorm(Hd, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(Hd, config.norm_eps) if config.qk_norm else None

    def forward(self, x_BSD, cos, sin, mask_BQK, cache):
        B, S, _ = x_BSD.shape
        H, G, Hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x_BSD).view(B, S, H, Hd)
        k = self.k_proj(x_BSD).view(B, S, G, Hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, G, Hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, G, P + S, Hd)
        if G != H:
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask_BQK)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * Hd))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """The router's state (gate weight, selection bias, thresholds, hash table) under moe-train's names."""

    def __init__(self, config: MoETrainConfig) -> None:
        super().__init__()
        r = config.moe_routing
        self.name, self.settings = r["name"], r
        E, D = r["num_experts"], config.hidden_size
        if self.name != "hash":
            self.weight = nn.Parameter(torch.empty(E, D))
        if self.name == "sigmoid" and r["loss_free_bias"]:
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        if self.name == "expert_choice":
            self.register_buffer("threshold", torch.zeros(E, dtype=torch.float32))
            self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))
        if self.name == "hash":
            self.register_buffer("table", torch.zeros(r["num_hashes"], config.vocab_size, dtype=torch.int64))

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None, seq_len: int):
        dtype = torch.promote_types(x_TD.dtype, torch.float32)  # router maths in fp32
        if self.name == "hash":
            if token_ids_T is None:
                raise ValueError("hash routing needs input_ids (it routes by token id), not inputs_embeds")
            return route_hash(token_ids_T, self.settings, self.table, dtype)
        logits_TE = nn.functional.linear(x_TD.to(dtype), self.weight.to(dtype))
        if self.name == "sigmoid":
            return route_sigmoid(logits_TE, self.settings, getattr(self, "e_score_correction_bias", None))
        if self.name == "expert_choice":
            if self.settings["eval_routing"] == "threshold" and int(self.threshold_updates) == 0:
                raise RuntimeError("expert_choice thresholds were never estimated (the model was not trained)")
            return route_expert_choice(logits_TE, self.settings, self.threshold, seq_len)
        return LOGIT_ROUTERS[self.name](logits_TE, self.settings)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, expert_hidden_size: int) -> None:
        super().__init__()
        self.w_gate_up_ED2F = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * expert_hidden_size))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, expert_hidden_size, hidden_size))

    def forward(self, x_TD, token_A, expert_A, weight_A):
        """``out[token_A[a]] += weight_A[a] · expert_{expert_A[a]}(x[token_A[a]])``, summed in fp32."""
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        F = self.w_down_EFD.shape[1]
        for e in torch.unique(expert_A).tolist():
            sel = expert_A == e
            rows = token_A[sel]
            h = x_TD[rows] @ self.w_gate_up_ED2F[e]
            y = (nn.functional.silu(h[:, :F]) * h[:, F:]) @ self.w_down_EFD[e]
            out_TD.index_add_(0, rows, y.float() * weight_A[sel].float().unsqueeze(1))
        return out_TD.to(x_TD.dtype)


class MoELayer(nn.Module):
    def __init__(self, config: MoETrainConfig) -> None:
        super().__init__()
        m, D = config.moe_train["moe"], config.hidden_size
        self.router = Router(config)
        self.experts = Experts(m["num_experts"], D, m["expert_hidden_size"])
        shared = config.moe_routing["shared_hidden_size"]
        self.shared_experts = SwiGLU(D, shared) if shared else None
        self.shared_expert_gate = nn.Linear(D, 1, bias=False) if m["shared_expert_gate"] else None

    def forward(self, x_BSD, token_ids_BS):
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        token_ids_T = None if token_ids_BS is None else token_ids_BS.reshape(B * S)
        token_A, expert_A, weight_A = self.router(x_TD, token_ids_T, S)
        out_TD = self.experts(x_TD, token_A, expert_A, weight_A)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        return out_TD.reshape(B, S, D)


def is_moe_layer(config: MoETrainConfig, index: int) -> bool:
    m = config.moe_train.get("moe")
    if not m:
        return False
    i = index - m["first_dense_layers"]
    return i >= 0 and i % m["moe_every"] == 0


class DecoderLayer(nn.Module):
    def __init__(self, config: MoETrainConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.is_moe = is_moe_layer(config, layer_idx)
        self.mlp = MoELayer(config) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x_BSD, cos, sin, mask, cache, token_ids_BS):
        h = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos, sin, mask, cache)
        normed = self.post_attention_layernorm(h)
        return h + (self.mlp(normed, token_ids_BS) if self.is_moe else self.mlp(normed))


class MoETrainPreTrainedModel(PreTrainedModel):
    config_class = MoETrainConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    # As in moe-train: the selection bias stays fp32 in a bf16 model (updates of 1e-3 vanish in bf16 next to ~2).
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Experts):
            nn.init.normal_(module.w_gate_up_ED2F, std=std)
            nn.init.normal_(module.w_down_EFD, std=std)
        elif isinstance(module, Router) and hasattr(module, "weight"):
            nn.init.normal_(module.weight, std=std)


class MoETrainModel(MoETrainPreTrainedModel):
    def __init__(self, config: MoETrainConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = make_norm(config)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = x_BSD.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        P = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(P, P + S, device=x_BSD.device).unsqueeze(0).expand(B, S)
        cos, sin = self.rotary(position_ids, x_BSD.dtype)
        # Query i (position P + i) sees keys 0..P + i, and no key the 2-D attention_mask marks as padding.
        allowed = torch.ones(S, P + S, dtype=torch.bool, device=x_BSD.device).tril(diagonal=P)[None, None]
        if attention_mask is not None and attention_mask.dim() == 2:
            allowed = allowed & attention_mask[:, None, None, -(P + S):].bool()
        mask = torch.zeros(allowed.shape, dtype=x_BSD.dtype, device=x_BSD.device)
        mask = mask.masked_fill(~allowed, torch.finfo(x_BSD.dtype).min)
        for layer in self.layers:
            x_BSD = layer(x_BSD, cos, sin, mask, cache, input_ids)
        return self.norm(x_BSD), cache


class MoETrainForCausalLM(MoETrainPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoETrainConfig) -> None:
        super().__init__(config)
        self.model = MoETrainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        # transformers 5 passes the KV cache as ``cache``, earlier versions as ``past_key_values``. NOTE: not
        # ``cache or past_key_values``: an empty cache has length 0, so it is falsy.
        cache = cache if cache is not None else past_key_values
        hidden_BSD, cache = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache)
        if logits_to_keep:
            hidden_BSD = hidden_BSD[:, -logits_to_keep:]
        logits = self.lm_head(hidden_BSD)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
