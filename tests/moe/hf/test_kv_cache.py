"""Incremental decoding with ``KVCache`` gives the logits of the full sequence (fp32, 1e-5).

A multi-token prompt, then a multi-token chunk (the causal mask must be offset by the cache length), then single
tokens; for a dense model, an MoE model, and the Qwen options (q/k/v bias, per-head q/k norm, gated shared expert).
"""

from __future__ import annotations

import pytest
import torch

from moe.config import ModelConfig, MoEConfig, RouterConfig
from moe.model import MoEModel

ATOL = 1e-5


def _config(moe: bool, **kw) -> ModelConfig:
    base = dict(vocab_size=61, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=40,
                max_position_embeddings=32, rope_theta=500.0)
    base.update(kw)
    moe_kw = base.pop("moe_kw", {})
    router = RouterConfig(top_k=2)
    base["moe"] = MoEConfig(num_experts=5, expert_hidden_size=16, router=router, **moe_kw) if moe else None
    return ModelConfig(**base)


CASES = {
    "dense": (False, {}),
    "moe": (True, {}),
    "moe_qwen_options": (True, {"qkv_bias": True, "qk_norm": True, "num_kv_heads": 1,
                                "moe_kw": {"num_shared_experts": 1, "shared_expert_gate": True,
                                           "first_dense_layers": 1}}),
}


def _randomize(model: MoEModel) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)


@pytest.mark.parametrize("case", list(CASES))
def test_incremental_logits_equal_full_sequence(case):
    moe, kw = CASES[case]
    model = MoEModel(_config(moe, **kw)).eval()
    _randomize(model)
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        chunks = [(0, 5), (5, 8), (8, 9), (9, 10), (10, 11), (11, 12)]  # prompt, a 3-token chunk, single tokens
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in chunks]
    assert cache.length == 12 and cache.keys[0].shape == (2, model.cfg.num_kv_heads, 12, 8)
    inc = torch.cat(parts, dim=1)
    assert full.abs().max() > 0.1
    torch.testing.assert_close(inc, full, rtol=0, atol=ATOL)


def test_cache_respects_max_positions():
    model = MoEModel(_config(False, max_position_embeddings=6)).eval()
    cache = model.new_cache()
    model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="sequence length 7 exceeds model.max_position_embeddings"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_options_off_keep_parameter_names():
    """The new options default to off and add no parameters (checkpoints of earlier runs still load)."""
    names = set(MoEModel(_config(True)).state_dict())
    assert not any("q_norm" in n or "k_norm" in n or "shared_expert_gate" in n or n.endswith("q_proj.bias")
                   for n in names)


def test_shared_expert_gate_needs_shared_experts():
    with pytest.raises(ValueError, match="moe.shared_expert_gate needs shared experts"):
        MoEConfig(shared_expert_gate=True)
