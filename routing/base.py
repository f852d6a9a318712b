"""The router interface: every router maps tokens to a flat list of (token, expert, weight) assignments.

Shape legend: T tokens, D model width, E experts, K slots per token, A assignments.

Why assignments and not a ``[T, K]`` matrix: top-k gives A = T·k (less what capacity drops), expert choice
gives A = E·C, adaptive and hash routers give variable counts. One flat list fits all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class Routing:
    """What a router decided for one MoE layer.

    Attributes:
        token_index: (A,) int64, the row of the flattened ``[T, D]`` input each assignment reads.
        expert_index: (A,) int64, the expert that computes it.
        weight: (A,) float32 (float64 for float64 inputs), the combine weight; carries the router's gradient.
        tokens_per_expert: (E,) int64, ``bincount(expert_index, minlength=E)``.
        losses: name -> scalar tensor, each already multiplied by its coefficient; the model adds their sum
            to the task loss. Not divided by layers or accumulation steps.
        stats: name -> detached tensor, for logs (load, entropy, dropped fraction, ...).
        expert_grad_scale: None (ordinary gradients), or (A,) detached: the gradient flowing back into each
            assignment's expert output is multiplied by it, the forward value unchanged. GRIN's SparseMixer-v2
            gives ``1/s`` so that the experts learn from ``p·FFN`` while the forward is ``s·p·FFN`` (GRIN, Algorithm 1).
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    weight: torch.Tensor
    tokens_per_expert: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_grad_scale: torch.Tensor | None = None

    @property
    def num_assignments(self) -> int:
        return self.token_index.numel()


@dataclass(kw_only=True)
class NoOptions:
    """Routers without settings of their own beyond ``RouterConfig``'s common ones."""


class Router(nn.Module):
    """Base class: ``forward(x_TD, token_ids_T, seq_len) -> Routing``.

    Args of ``forward``:
        x_TD: (T, D) the normalised hidden states, T = B·S flattened batch-major.
        token_ids_T: (T,) the input token ids, which the model passes to every MoE layer (hash routing
            needs them); routers that do not use them ignore them.
        seq_len: S, so that sequence-level statistics can split the T tokens into B sequences.

    Each router file defines its class, a ``@dataclass(kw_only=True) Options`` for its own settings (read
    from ``router.options`` of a recipe; unknown keys are errors), and ``from_config``. Learned routers derive
    from ``moe.routing.linear.LinearRouter`` (the gate ``W x``), token-choice ones from
    ``moe.routing.token_choice.TokenChoiceRouter`` (the common settings, losses and ``from_config``).
    """

    Options: ClassVar[type] = NoOptions
    num_experts: int

    @classmethod
    def from_config(cls, moe_cfg: Any, hidden_size: int) -> "Router":  # pragma: no cover
        """Build from a ``moe.config.MoEConfig`` (typed loosely so this package does not import ``moe``)."""
        raise NotImplementedError

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                seq_len: int | None = None) -> Routing:  # pragma: no cover
        raise NotImplementedError

    def check_ready(self) -> None:
        """``ValueError`` (one line, naming the setting that fixes it) if the router cannot route yet; the trainer
        asks before it writes anything. Routers with nothing to prepare are always ready."""

    def on_optimizer_step(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Called by the trainer once after every optimizer step, e.g. to update a load-balancing bias from
        the load observed over the step's micro-batches. Routers without such state have nothing to do.

        Args:
            all_reduce: sums a tensor over the data-parallel ranks (given by ``parallel/`` when distributed,
                None on one process), so that state derived from the load stays identical on every rank.
        """


def loss_overrides(router_cfg: Any) -> dict[str, Any]:
    """The load-balancing settings a recipe set explicitly; unset (None) ones keep the router's default."""
    names = ("aux_loss_coef", "lb_f_normalization")
    return {n: getattr(router_cfg, n) for n in names if getattr(router_cfg, n) is not None}


def router_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of router maths: fp32, or float64 for float64 inputs (used by exact gradient tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def routing_stats(
    probs_TE: torch.Tensor | None,
    tokens_per_expert_E: torch.Tensor,
    num_tokens: int,
    dropped: int | torch.Tensor = 0,
    requested: int | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The detached statistics every router reports.

    Args:
        probs_TE: router distribution (None for routers without one, e.g. hash).
        tokens_per_expert_E: computed assignments per expert.
        num_tokens: T.
        dropped: assignments removed by capacity.
        requested: assignments before dropping (defaults to computed + dropped).
    """
    with torch.no_grad():
        load = tokens_per_expert_E.float()
        computed = load.sum()
        dropped_t = torch.as_tensor(dropped, dtype=torch.float32, device=load.device)
        requested_t = computed + dropped_t if requested is None else torch.as_tensor(requested, dtype=torch.float32)
        mean_load = load.mean()
        stats = {
            "tokens_per_expert": tokens_per_expert_E.detach().clone(),
            "dropped_fraction": dropped_t / requested_t.clamp(min=1),
            "max_load_ratio": load.max() / mean_load.clamp(min=1e-9) if load.numel() else load.new_zeros(()),
            "experts_per_token": computed / max(num_tokens, 1),
        }
        if probs_TE is not None:
            p = probs_TE.detach().float()
            stats["router_entropy"] = -(p * p.clamp(min=1e-30).log()).sum(-1).mean()
        return stats
