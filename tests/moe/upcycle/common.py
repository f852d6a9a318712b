"""Tiny float64 dense models and helpers shared by the upcycling tests."""

from __future__ import annotations

import torch

from moe.config import ModelConfig, MoEConfig, RouterConfig
from moe.model import MoEModel

VOCAB, D = 50, 16


def dense_model(*, num_layers: int = 2, F: int = 24, tie: bool = False, std: float = 0.3,
                dtype: torch.dtype = torch.float64, seed: int = 0) -> MoEModel:
    """A random dense model. A large init std makes the FFNs matter next to the residual stream, so a wrong
    conversion shows in the logits."""
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=D, num_layers=num_layers, num_heads=2, num_kv_heads=1,
                      intermediate_size=F, initializer_range=std, tie_word_embeddings=tie, moe=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MoEModel(cfg).to(dtype).eval()


def moe_cfg(E: int, k: int, M: int, *, renormalize: bool = True, **kw) -> MoEConfig:
    return MoEConfig(num_experts=E, expert_hidden_size=M, router=RouterConfig(top_k=k, renormalize=renormalize),
                     backend="reference", **kw)


def token_ids(B: int = 2, S: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def logits(model: MoEModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def expert_linear(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An MoE layer's experts in ``nn.Linear`` layout: gate (E, M, D), up (E, M, D), down (E, D, M)."""
    ex = layer.experts
    M = ex.expert_hidden_size
    w = ex.w_gate_up_ED2F.detach()
    return w[:, :, :M].transpose(1, 2), w[:, :, M:].transpose(1, 2), ex.w_down_EFD.detach().transpose(1, 2)


def swiglu(x: torch.Tensor, gate_MD: torch.Tensor, up_MD: torch.Tensor, down_DM: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ gate_MD.T) * (x @ up_MD.T)) @ down_DM.T


def dense_ffn(model: MoEModel, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mlp = model.layers[i].mlp
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()


def probe(n: int = 24, seed: int = 2) -> torch.Tensor:
    """(1, n, D) float64 layer inputs."""
    return torch.randn(1, n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
