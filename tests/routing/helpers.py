"""Helpers that the router tests share."""

from __future__ import annotations

import torch

from moe.routing.linear import LinearRouter


def identity_gate(router: LinearRouter) -> LinearRouter:
    """Set ``W = I`` (the router needs D = E), so that its logits are its input and a test can write them."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(router.num_experts, dtype=router.weight.dtype))
    return router
