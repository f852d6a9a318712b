"""A decoder-only language model of the Llama / Mixtral family, with dense or MoE feed-forwards per layer.

Shape legend: B batch, S sequence (new tokens), P positions already in the KV cache, D model width, H query heads,
G key/value heads, Hd head width, V vocab.

The maths is that of ``transformers``' Llama and Mixtral for the same weights (RMSNorm in fp32, rotary
embedding with the rotate-half layout, grouped-query attention, SwiGLU), and the parameter names follow
theirs where the layout allows, so import and export are renames and transposes. Config options that default to
off add the Qwen variants: ``qkv_bias`` (Qwen2), ``qk_norm`` (Qwen3), a gated shared expert (Qwen2-MoE, in
``moe.layer``), and ``norm: layernorm`` PhiMoE's LayerNorms (``torch.nn.LayerNorm``, with a bias) in place of the
RMSNorms.

Incremental decoding: ``model(ids, cache=KVCache(...))`` appends each layer's keys and values to the cache and
offsets the rotary positions by what the cache already holds, so a prompt followed by one token at a time
gives the logits of the full sequence (``tests/moe/hf/test_kv_cache.py``). Routers see only the new tokens: exact
for per-token routers (top-k, dropless), not for routers whose choice depends on other tokens (capacity in
eval mode, expert choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from moe.config import ModelConfig
from moe.ffn import SwiGLU
from moe.layer import MoELayer
from moe.routing.base import Routing


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: normalise in fp32 and cast back before the weight, exactly as transformers' LlamaRMSNorm.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def layer_norm(cfg: ModelConfig) -> nn.Module:
    """The norm of ``cfg.norm`` over the model width: RMSNorm, or ``nn.LayerNorm`` (PhiMoE) with the same eps."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embedding (RoFormer), ``inv_freq_i = theta^(-2i/Hd)``."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_S: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_SH = positions_S.float()[:, None] * self.inv_freq.float()[None, :]  # (S, Hd/2)
        emb_SHd = torch.cat((freqs_SH, freqs_SH), dim=-1)  # (S, Hd)
        return emb_SHd.cos().to(dtype), emb_SHd.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x_BHSHd: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
    return x_BHSHd * cos_SHd + _rotate_half(x_BHSHd) * sin_SHd


class KVCache:
    """Keys and values of the positions seen so far, one pair per layer, for incremental decoding.

    Each layer's keys/values are (B, G, P, Hd): after the rotary embedding, before the grouped-query repeat.
    ``length`` (P) is the rotary offset of the next tokens; ``MoEModel.forward`` advances it.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0

    def append(self, layer: int, k_BGSHd: torch.Tensor, v_BGSHd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of ``layer``; return all of them, (B, G, P + S, Hd)."""
        past_k, past_v = self.keys[layer], self.values[layer]
        if past_k is not None and past_v is not None:
            k_BGSHd = torch.cat((past_k, k_BGSHd), dim=2)
            v_BGSHd = torch.cat((past_v, v_BGSHd), dim=2)
        self.keys[layer], self.values[layer] = k_BGSHd, v_BGSHd
        return k_BGSHd, v_BGSHd


@dataclass
class LayerCache:
    """One layer's view of a ``KVCache`` (what ``Attention.forward`` takes)."""

    cache: KVCache
    layer: int


class Attention(nn.Module):
    """Causal grouped-query attention through ``scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.attention_head_dim
        D, Hd = cfg.hidden_size, self.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias  # Llama: all four or none; Qwen2: q, k, v only
        self.q_proj = nn.Linear(D, cfg.num_heads * Hd, bias=qkv_bias)
        self.k_proj = nn.Linear(D, cfg.num_kv_heads * Hd, bias=qkv_bias)
        self.v_proj = nn.Linear(D, cfg.num_kv_heads * Hd, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * Hd, D, bias=cfg.attention_bias)
        # Qwen3: per-head RMSNorm of queries and keys, weights shared by all heads.
        self.q_norm = RMSNorm(Hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(Hd, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x_BSD: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor,
                kv: LayerCache | None = None) -> torch.Tensor:
        """``cos_SHd``/``sin_SHd`` hold the positions P..P+S-1 of the new tokens; ``kv`` the earlier ones."""
        B, S, _ = x_BSD.shape
        H, G, Hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x_BSD).view(B, S, H, Hd)
        k = self.k_proj(x_BSD).view(B, S, G, Hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, S, Hd), (B, G, S, Hd)
        v = self.v_proj(x_BSD).view(B, S, G, Hd).transpose(1, 2)
        q, k = apply_rotary(q, cos_SHd, sin_SHd), apply_rotary(k, cos_SHd, sin_SHd)
        mask = None
        is_causal = S > 1
        if kv is not None:
            k, v = kv.cache.append(kv.layer, k, v)  # (B, G, P + S, Hd)
            P = k.shape[2] - S
            if P > 0 and S > 1:
                # NOTE: ``is_causal`` aligns the mask top-left, which is wrong once P > 0: query i sits at
                # position P + i and sees keys 0..P + i. One new token (S == 1) sees every key: no mask.
                mask = torch.ones(S, P + S, dtype=torch.bool, device=x_BSD.device).tril(diagonal=P)
            is_causal = is_causal and P == 0
        if G != H:  # each key/value head serves H/G query heads
            k = k.repeat_interleave(H // G, dim=1)
            v = v.repeat_interleave(H // G, dim=1)
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, H, S, Hd)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * Hd))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = layer_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = layer_norm(cfg)
        self.is_moe = cfg.moe is not None and cfg.moe.is_moe_layer(index)
        if self.is_moe:
            self.mlp: nn.Module = MoELayer(cfg.moe, cfg.hidden_size, cfg.initializer_range)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BSD: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor,
                token_ids_BS: torch.Tensor, kv: LayerCache | None = None) -> tuple[torch.Tensor, Routing | None]:
        h_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos_SHd, sin_SHd, kv)
        normed = self.post_attention_layernorm(h_BSD)
        routing = None
        if self.is_moe:
            ffn_BSD, routing = self.mlp(normed, token_ids_BS)
        else:
            ffn_BSD = self.mlp(normed)
        return h_BSD + ffn_BSD, routing


@dataclass
class ModelOutput:
    """Attributes:
        logits: (B, S, V).
        loss: mean cross-entropy over targets != -100 (None without targets).
        aux_loss: sum of every MoE layer's auxiliary losses (already weighted); 0 for a dense model.
        routings: one ``Routing`` per MoE layer, in layer order (their ``losses`` and ``stats`` are per layer).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    routings: list[Routing] = field(default_factory=list)


class MoEModel(nn.Module):
    """Token embedding -> N decoder layers -> norm -> LM head (tied to the embedding by config)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = layer_norm(cfg)
        self.rotary = RotaryEmbedding(cfg.attention_head_dim, cfg.rope_theta)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Recompute each decoder layer in the backward pass instead of keeping its activations (training only).
        # NOTE: routers with load counters (sigmoid's bias) count a recomputed layer twice; every micro-batch
        # alike, so the sign-based bias update is unchanged.
        self.activation_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def new_cache(self) -> KVCache:
        """An empty KV cache for ``forward(..., cache=...)``."""
        return KVCache(len(self.layers))

    def forward(self, input_ids_BS: torch.Tensor, targets_BS: torch.Tensor | None = None, *,
                cache: KVCache | None = None) -> ModelOutput:
        """Logits (and the loss against ``targets_BS``) of ``input_ids_BS``.

        Args:
            input_ids_BS: (B, S) token ids.
            targets_BS: (B, S) next-token ids, -100 where ignored; None for no loss.
            cache: for incremental decoding: the keys/values of the P earlier positions. The new tokens take
                positions P..P+S-1, attend to the cached ones, and are appended to the cache.
        """
        B, S = input_ids_BS.shape
        P = 0 if cache is None else cache.length
        if P + S > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {P + S} exceeds model.max_position_embeddings "
                             f"({self.cfg.max_position_embeddings})")
        x_BSD = self.embed_tokens(input_ids_BS)
        cos_SHd, sin_SHd = self.rotary(torch.arange(P, P + S, device=input_ids_BS.device), x_BSD.dtype)
        routings: list[Routing] = []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else LayerCache(cache, i)
            if self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x_BSD, routing = torch.utils.checkpoint.checkpoint(
                    layer, x_BSD, cos_SHd, sin_SHd, input_ids_BS, None, use_reentrant=False)
            else:
                x_BSD, routing = layer(x_BSD, cos_SHd, sin_SHd, input_ids_BS, kv)
            if routing is not None:
                routings.append(routing)
        if cache is not None:
            cache.length = P + S
        logits_BSV = self.lm_head(self.norm(x_BSD))
        loss = None
        if targets_BS is not None:
            loss = nn.functional.cross_entropy(logits_BSV.float().reshape(B * S, -1), targets_BS.reshape(B * S),
                                               ignore_index=-100)
        aux = sum((l for r in routings for l in r.losses.values()), start=x_BSD.new_zeros((), dtype=torch.float32))
        return ModelOutput(logits=logits_BSV, loss=loss, aux_loss=aux, routings=routings)

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those one token uses (top-k of the routed experts) when ``active``."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for layer in self.layers:
            if layer.is_moe:
                ex = layer.mlp.experts
                per_expert = (ex.w_gate_up_ED2F.numel() + ex.w_down_EFD.numel()) // ex.num_experts
                k = getattr(layer.mlp.router, "top_k", 1)
                total -= per_expert * (ex.num_experts - k)
        return total


def flops_per_token(model: MoEModel, seq_len: int) -> float:
    """Training FLOPs per token: 6 × active non-embedding parameters + attention scores (PaLM appendix B)."""
    cfg = model.cfg
    active = model.num_parameters(active=True) - model.embed_tokens.weight.numel()
    if cfg.tie_word_embeddings:
        active += model.embed_tokens.weight.numel()  # the tied LM head still multiplies
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.attention_head_dim * seq_len
    return 6 * active + attention
