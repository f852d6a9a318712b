"""Activation checkpointing recomputes layers in the backward pass: same loss, same gradients."""

import torch

from moe.config import ModelConfig, MoEConfig, RouterConfig
from moe.model import MoEModel


def test_checkpointed_model_gives_the_same_loss_and_gradients():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                      intermediate_size=48, moe=MoEConfig(num_experts=4, expert_hidden_size=16,
                                                          first_dense_layers=1, router=RouterConfig(top_k=2)))
    model = MoEModel(cfg).double()
    ids = torch.randint(0, 64, (2, 9))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        out = model(ids, ids)
        (out.loss + out.aux_loss).backward()
        grads.append((out.loss.item(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, ga), (loss_b, gb) = grads
    assert loss_a == loss_b
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-12)
