"""``model.norm``: RMSNorm (default) or LayerNorm with a bias (PhiMoE) for the layer norms; qk_norm stays RMSNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe.config import ModelConfig, MoEConfig, load_recipe
from moe.model import MoEModel, RMSNorm


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=24,
                max_position_embeddings=32, rms_norm_eps=1e-3, moe=MoEConfig(num_experts=3, expert_hidden_size=8))
    return ModelConfig(**{**base, **kw})


def test_layernorm_replaces_every_layer_norm_but_not_qk_norm():
    model = MoEModel(_cfg(norm="layernorm", qk_norm=True))
    norms = [model.norm] + [n for layer in model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert all(isinstance(n, nn.LayerNorm) and n.eps == 1e-3 and n.bias is not None for n in norms)
    assert isinstance(model.layers[0].self_attn.q_norm, RMSNorm)
    names = set(model.state_dict())
    assert {"norm.bias", "layers.0.input_layernorm.bias", "layers.1.post_attention_layernorm.bias"} <= names
    assert "norm.bias" not in MoEModel(_cfg()).state_dict()


def test_layernorm_model_computes_layer_norm_with_bias_and_learns_it():
    torch.manual_seed(0)
    model = MoEModel(_cfg(norm="layernorm", moe=None, num_layers=1)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)
    ids = torch.randint(0, 50, (2, 7))
    layer = model.layers[0]
    x = model.embed_tokens(ids)
    ln = layer.input_layernorm
    # The norm by hand: (x - mean) / sqrt(var + eps) * w + b, the biased variance, as torch.nn.LayerNorm.
    by_hand = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-3)
    torch.testing.assert_close(ln(x), by_hand * ln.weight + ln.bias, rtol=1e-5, atol=1e-5)
    model.train()
    model(ids, ids).loss.backward()
    assert model.norm.bias.grad is not None and model.norm.bias.grad.abs().sum() > 0


def test_norm_option_from_a_recipe_and_its_error():
    assert load_recipe(None, ["model.norm=layernorm"]).model.norm == "layernorm"
    with pytest.raises(ValueError, match="model.norm"):
        load_recipe(None, ["model.norm=batchnorm"])
