"""Configuration of a moe-train model exported as remote code (``AutoConfig`` with ``trust_remote_code=True``).

Written by ``moe export`` beside ``modeling_moe_train.py`` for the models that no native ``transformers`` layout
expresses exactly. ``moe_train`` is the model section of the moe-train recipe that trained it (``moe import`` reads
it back); ``moe_routing`` holds the router's inference settings, resolved (``routing_moe_train.py``).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MoETrainConfig(PretrainedConfig):
    model_type = "moe_train"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size: int = 256, hidden_size: int = 128, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: int | None = None,
                 intermediate_size: int = 512, max_position_embeddings: int = 2048, rope_theta: float = 10000.0,
                 norm: str = "rmsnorm", norm_eps: float = 1e-5, attention_bias: bool = False, qkv_bias: bool = False,
                 qk_norm: bool = False, initializer_range: float = 0.02, moe_train: dict | None = None,
                 moe_routing: dict | None = None, use_cache: bool = True, tie_word_embeddings: bool = False,
                 **kwargs) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.norm = norm
        self.norm_eps = norm_eps
        self.attention_bias = attention_bias
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.initializer_range = initializer_range
        self.moe_train = moe_train or {}
        self.moe_routing = moe_routing
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
