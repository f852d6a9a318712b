"""Tiny random models for the Hugging Face tests: our side (a run directory) and theirs (``save_pretrained``).

Weights are randomised with norms away from 1 and projections at std 0.15, so that a mis-mapped tensor cannot hide
behind an init of ones or zeros and routing is far from uniform (no near-ties between experts).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe.config import ModelConfig, MoEConfig, RouterConfig
from moe.rundir import write_run
from moe.model import MoEModel

VOCAB = 97


def tiny_config(moe: dict | None = None, router: dict | None = None, **kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=48,
                max_position_embeddings=64, rope_theta=1234.0, rms_norm_eps=1e-6)
    base.update(kw)
    if moe is not None:
        r = RouterConfig(**{"top_k": 2, **(router or {})})
        base["moe"] = MoEConfig(num_experts=4, expert_hidden_size=24, router=r, **moe)
    else:
        base["moe"] = None
    return ModelConfig(**base)


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.15)
    return module


def make_run(path: Path, cfg: ModelConfig) -> tuple[MoEModel, dict[str, torch.Tensor]]:
    """A random ``MoEModel(cfg)`` saved as a run directory at ``path``; returns it and the saved state."""
    model = randomize_(MoEModel(cfg)).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    write_run(path, cfg, state)
    return model, state


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, (a.shape, b.shape, a.dtype, b.dtype)
    assert a.abs().max() > 0.1  # not two near-zero tensors
    return (a - b).abs().max().item()


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy generation of ``n`` new tokens (no end-of-sequence stop)."""
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
