"""Training-only router noise (docs/routers.md#jitter), chosen by name from ``RouterConfig.jitter``.

Shape legend: T tokens, D model width, E experts.

A router applies the three hooks in order, and each is the identity except for its own variant:

* ``router_input(x_TD)``   — ``input_jitter``: the *router's copy* of the input times ``U(1-ε, 1+ε)``
  (Switch Transformer; the reference framework router). The experts keep the clean input: the router
  never returns or modifies the tensor it was given.
* ``logits(z_TE)``         — ``logit_mult_jitter``: ``z ⊙ U(1-ε, 1+ε)`` (SparseMixer's Switch baseline gate).
  The jittered logits are the router's logits from then on (weights, losses), as in the source.
* ``selection(z_TE)``      — ``gumbel``: ``z + Gumbel(0, 1)``, used only to *choose* experts, so that the
  argmax of the noisy logits is a sample from ``softmax(z)`` (GShard "sampling", SparseMixer). The combine
  weights and losses keep the clean logits: a gate scaled by a noisy ``softmax(z + G)`` is in no source.

Every hook is the identity in ``eval()``. Not offered here: ``hf_input_jitter`` (it jitters the experts'
input too, which a router cannot do) and ``noisy_topk`` (it needs its own noise weights and losses).
"""

from __future__ import annotations

import torch
from torch import nn

JITTERS = ("none", "input_jitter", "logit_mult_jitter", "gumbel")


def _uniform_factor(like: torch.Tensor, eps: float) -> torch.Tensor:
    """Elementwise ``U(1-ε, 1+ε)`` with the shape, dtype and device of ``like``."""
    return torch.empty_like(like).uniform_(1.0 - eps, 1.0 + eps)


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples: ``-log(Exp(1))``, clamped away from ``log(0)``."""
    return -torch.empty_like(like).exponential_().clamp_(min=torch.finfo(like.dtype).tiny).log()


class Jitter(nn.Module):
    """One of ``JITTERS``; holds no parameters or buffers, so checkpoints do not depend on it.

    Args:
        kind: the variant's name.
        eps: ε of the multiplicative variants (unused by ``gumbel`` and ``none``).
    """

    def __init__(self, kind: str = "none", eps: float = 1e-2) -> None:
        super().__init__()
        if kind not in JITTERS:
            raise ValueError(f"router.jitter: unknown jitter {kind!r}; valid: {', '.join(JITTERS)}")
        if not 0 <= eps < 1:
            raise ValueError(f"router.jitter_eps must be in [0, 1), got {eps}")
        self.kind = kind
        self.eps = eps

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, eps={self.eps}"

    def router_input(self, x_TD: torch.Tensor) -> torch.Tensor:
        """A jittered copy of the router input for ``input_jitter``; ``x_TD`` itself is never modified."""
        if self.training and self.kind == "input_jitter":
            return x_TD * _uniform_factor(x_TD, self.eps)
        return x_TD

    def logits(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """The logits the router uses from here on (``logit_mult_jitter``)."""
        if self.training and self.kind == "logit_mult_jitter":
            return logits_TE * _uniform_factor(logits_TE, self.eps)
        return logits_TE

    def selection(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """Logits used only to choose the experts (``gumbel``); no gradient flows through the choice."""
        if self.training and self.kind == "gumbel":
            return logits_TE.detach() + gumbel_noise(logits_TE)
        return logits_TE
