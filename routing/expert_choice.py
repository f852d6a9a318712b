"""Expert Choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Shape legend: T tokens, D model width, E experts, G routing groups, N tokens per group, C tokens per expert
per group (the capacity), A assignments (= G·E·C in top-C mode).

Training: ``S = softmax(x W^T)`` per token over experts, in fp32. Within each routing group of N tokens every
expert takes its C highest-scoring tokens, ``C = min(N, max(1, min_capacity, round(c·N/E)))`` with ``c`` the
capacity factor (average experts per token; ``moe.capacity_factor``, default 2 as "EC-CF2"). The combine
weight of a (token, expert) pair is ``S[t, e]``; gradient flows through the selected ``S[t, e]`` only (and, via
the softmax, into all logits of token ``t``); the selection itself is not differentiated. A token may be taken
by 0..E experts; one taken by none gets MoE output 0 and keeps only its residual. No load-balancing loss
(balance holds by construction: ``tokens_per_expert ≡ C``); the router z-loss is available.

Causality. Whether expert ``e`` takes token ``t`` depends on ``S[t', e]`` for every ``t'`` of the group,
*including later tokens of the same sequence*: a causal language model can learn to read the future from its
own routing. Every model of this library is a causal decoder, so building this router raises ``ValueError``
unless ``router.options.allow_causal_leak: true``. ``group: microbatch`` (the default) mixes the B sequences
of a micro-batch in one group, which dilutes but does not remove the leak (the paper's limitations section suggests it);
``group: sequence`` makes each sequence its own group (the strongest leak, but no dependence on the other
sequences of the batch).

Inference (``eval()``), chosen by ``router.options.eval_routing``:

* ``top_c`` (default): the same top-C over the eval group, with ``c = moe.eval_capacity_factor`` (or the
  training factor when that is null). Full-sequence scoring then computes the training function, leak
  included. Generation one token at a time is a *different* function: the group holds only the B new tokens,
  so ``C = min(B, max(1, min_capacity, ...))`` and, as soon as ``B ≤ min_capacity``, every expert takes every
  token (E experts per token instead of about c).
* ``threshold``: causal inference (our design; docs/routers.md#expert_choice). Token ``t`` goes to expert ``e`` iff
  ``S[t, e] ≥ τ_e``, where ``τ_e`` is an exponential moving average of the C-th largest ``S[:, e]`` per training
  group. The per-step mean is accumulated during training forwards and folded into ``τ`` in
  ``on_optimizer_step`` (summed over data-parallel ranks, so ``τ`` is identical everywhere). Routing a token
  then depends on that token alone: one-token-at-a-time generation equals full-sequence scoring, and the
  number of experts per token varies. ``τ`` is a buffer, saved in checkpoints; evaluating before any
  optimizer step has estimated it raises ``RuntimeError``.

``τ`` is tracked in both modes, so a model trained with ``top_c`` can be evaluated with ``threshold``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from moe.routing.base import Routing, routing_stats
from moe.routing.linear import LinearRouter
from moe.routing.losses import z_loss

# The paper's default: c = 2 ("EC-CF2", the compute of top-2 token choice).
DEFAULT_CAPACITY_FACTOR = 2.0

CAUSAL_LEAK_MESSAGE = (
    "expert_choice routing is not causal: each expert takes its top-C tokens of the whole routing group, so "
    "future tokens of the same sequence decide which earlier tokens an expert takes, and a causal language "
    "model can learn to read the future from its own routing (docs/routers.md#expert_choice). Every model of "
    "this library is a causal decoder; set router.options.allow_causal_leak: true to train it anyway (and consider "
    "router.options.eval_routing: threshold for causal inference)"
)


@dataclass(kw_only=True)
class Options:
    """``router.options`` of ``expert_choice``.

    Attributes:
        allow_causal_leak: build the router in a causal model although future tokens influence routing.
        group: the routing group: ``microbatch`` (all T tokens of the call) or ``sequence`` (each sequence).
        eval_routing: ``top_c`` (the training rule) or ``threshold`` (causal, per-expert EMA thresholds).
        threshold_momentum: EMA momentum of the thresholds, per optimizer step.
    """

    allow_causal_leak: bool = False
    group: Literal["microbatch", "sequence"] = "microbatch"
    eval_routing: Literal["top_c", "threshold"] = "top_c"
    threshold_momentum: float = 0.99

    def __post_init__(self) -> None:
        if self.group not in ("microbatch", "sequence"):
            raise ValueError(f"router.options.group must be 'microbatch' or 'sequence', got {self.group!r}")
        if self.eval_routing not in ("top_c", "threshold"):
            raise ValueError(f"router.options.eval_routing must be 'top_c' or 'threshold', got {self.eval_routing!r}")
        if not 0 <= self.threshold_momentum < 1:
            raise ValueError(f"router.options.threshold_momentum must be in [0, 1), got {self.threshold_momentum}")


def expert_choice_capacity(capacity_factor: float, group_size: int, num_experts: int, min_capacity: int) -> int:
    """``C = min(N, max(1, min_capacity, round(c·N/E)))``, rounding halves up (not to even)."""
    c = int(capacity_factor * group_size / num_experts + 0.5)
    return min(group_size, max(1, min_capacity, c))


def expert_choice_select(probs_GNE: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's top-``capacity`` tokens within each group, ties towards the lower token index.

    Args:
        probs_GNE: (G, N, E) router probabilities.
        capacity: C <= N.
    Returns:
        token_GEC: (G, E, C) int64, the token (row within its group) of each slot, best first.
        gate_GEC: (G, E, C) the selected probabilities ``S[t, e]``; differentiable w.r.t. ``probs_GNE``.
    """
    probs_GEN = probs_GNE.transpose(1, 2)
    with torch.no_grad():
        # A stable descending sort breaks ties towards the lower token index; torch.topk does not promise it.
        token_GEC = torch.sort(probs_GEN, dim=-1, descending=True, stable=True).indices[..., :capacity]
    return token_GEC, probs_GEN.gather(-1, token_GEC)


class ExpertChoiceRouter(LinearRouter):
    """Linear router ``z = W x``; each expert takes its top-C tokens of the routing group (module docstring).

    Args:
        hidden_size: D.
        num_experts: E.
        capacity_factor: c, the average number of experts per token (training).
        eval_capacity_factor: c in ``eval()`` with ``eval_routing="top_c"`` (None: the training factor).
        min_capacity: lower bound on C (clamped to the group size).
        z_loss_coef: β of the router z-loss (0 disables it).
        init_std: std of the normal init of ``W``.
        causal: the router sits in a causal model; then ``allow_causal_leak`` must be True.
        allow_causal_leak, group, eval_routing, threshold_momentum: see ``Options``.
    """

    Options = Options

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 0,
        z_loss_coef: float = 0.0,
        init_std: float = 0.02,
        causal: bool = True,
        allow_causal_leak: bool = False,
        group: Literal["microbatch", "sequence"] = "microbatch",
        eval_routing: Literal["top_c", "threshold"] = "top_c",
        threshold_momentum: float = 0.99,
    ) -> None:
        if causal and not allow_causal_leak:
            raise ValueError(CAUSAL_LEAK_MESSAGE)
        Options(allow_causal_leak=allow_causal_leak, group=group, eval_routing=eval_routing,
                threshold_momentum=threshold_momentum)  # validates
        for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if value is not None and not value > 0:
                raise ValueError(f"expert_choice: moe.{name} must be > 0, got {value}")
        if num_experts < 1:
            raise ValueError(f"expert_choice: num_experts must be >= 1, got {num_experts}")
        # No router noise: recipes that ask for it are refused in from_config.
        super().__init__(hidden_size=hidden_size, num_experts=num_experts, init_std=init_std)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.z_loss_coef = z_loss_coef
        self.group = group
        self.eval_routing = eval_routing
        self.threshold_momentum = threshold_momentum
        # Inference thresholds τ_e (saved with the model) and how many optimizer steps have updated them.
        self.register_buffer("threshold", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))
        # Per-step accumulators of the C-th largest score per group (not saved: reset every step).
        self.register_buffer("_kth_sum", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("_kth_count", torch.zeros((), dtype=torch.float32), persistent=False)

    @classmethod
    def from_config(cls, moe_cfg, hidden_size: int) -> "ExpertChoiceRouter":
        rc = moe_cfg.router
        if rc.jitter != "none":
            raise ValueError(f"expert_choice does not implement router.jitter={rc.jitter!r}; set it to 'none'")
        opts: Options = rc.router_options()
        # NOTE: top_k, renormalize and aux_loss_coef do not apply: the number of experts per token follows from
        # the capacity factor, the gate is S[t, e] itself, and a load-balancing loss is meaningless when every
        # expert takes exactly C tokens (the Flaxformer reference returns aux = 0).
        return cls(
            hidden_size=hidden_size,
            num_experts=moe_cfg.num_experts,
            capacity_factor=DEFAULT_CAPACITY_FACTOR if moe_cfg.capacity_factor is None else moe_cfg.capacity_factor,
            eval_capacity_factor=moe_cfg.eval_capacity_factor,
            min_capacity=moe_cfg.min_capacity,
            z_loss_coef=rc.z_loss_coef,
            init_std=rc.init_std,
            causal=True,  # MoEModel is a causal decoder
            allow_causal_leak=opts.allow_causal_leak,
            group=opts.group,
            eval_routing=opts.eval_routing,
            threshold_momentum=opts.threshold_momentum,
        )

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                seq_len: int | None = None) -> Routing:
        T = x_TD.shape[0]
        E = self.num_experts
        # NOTE: router maths in fp32 (docs/routers.md#precision-and-ties): bf16 scores tie and flip the top-C choice.
        logits_TE = self.router_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)

        if not self.training and self.eval_routing == "threshold":
            token_A, expert_A, weight_A = self._route_by_threshold(probs_TE)
            capacity = None
        else:
            token_A, expert_A, weight_A, capacity = self._route_top_c(probs_TE, seq_len)

        losses: dict[str, torch.Tensor] = {}
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * z_loss(logits_TE)
        with torch.no_grad():
            tokens_per_expert_E = torch.bincount(expert_A, minlength=E)
            experts_per_token_T = torch.bincount(token_A, minlength=T)
            # No assignment is ever dropped (dropped_fraction = 0); the expert-choice form of dropping is a token
            # that no expert takes, reported as zero_expert_fraction (monitor it).
            stats = routing_stats(probs_TE, tokens_per_expert_E, T)
            counts_T = experts_per_token_T.float() if T else experts_per_token_T.new_zeros(1, dtype=torch.float32)
            stats["zero_expert_fraction"] = (counts_T == 0).float().mean() if T else counts_T.sum()
            stats["max_experts_per_token"] = counts_T.max()
            if capacity is not None:
                stats["capacity"] = torch.tensor(float(capacity))
        return Routing(token_index=token_A, expert_index=expert_A, weight=weight_A,
                       tokens_per_expert=tokens_per_expert_E, losses=losses, stats=stats)

    def _groups(self, T: int, seq_len: int | None) -> tuple[int, int]:
        """(G, N): the number of routing groups and their size."""
        if self.group == "microbatch" or seq_len is None or T == 0:
            return 1, T
        if seq_len < 1 or T % seq_len:
            raise ValueError(f"expert_choice with group='sequence': {T} tokens are not a whole number of "
                             f"sequences of length {seq_len}")
        return T // seq_len, seq_len

    def _route_top_c(self, probs_TE: torch.Tensor, seq_len: int | None):
        T, E = probs_TE.shape
        G, N = self._groups(T, seq_len)
        if N == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=probs_TE.device)
            return empty, empty, probs_TE.new_zeros(0), 0
        cf = self.capacity_factor
        if not self.training and self.eval_capacity_factor is not None:
            cf = self.eval_capacity_factor
        C = expert_choice_capacity(cf, N, E, self.min_capacity)
        token_GEC, gate_GEC = expert_choice_select(probs_TE.view(G, N, E), C)
        with torch.no_grad():
            offset_G11 = (torch.arange(G, device=probs_TE.device) * N).view(G, 1, 1)
            token_A = (token_GEC + offset_G11).reshape(-1)  # expert-major within each group
            expert_A = torch.arange(E, device=probs_TE.device).view(1, E, 1).expand(G, E, C).reshape(-1)
            if self.training:
                # The C-th largest score per (group, expert), for the inference thresholds.
                self._kth_sum += gate_GEC[..., -1].sum(0).to(self._kth_sum.dtype)
                self._kth_count += G
        return token_A, expert_A, gate_GEC.reshape(-1), C

    def _route_by_threshold(self, probs_TE: torch.Tensor):
        if int(self.threshold_updates) == 0:
            raise RuntimeError("expert_choice eval_routing='threshold': the thresholds have not been estimated yet; "
                               "they are updated by on_optimizer_step() after training forwards (or loaded from a "
                               "checkpoint)")
        with torch.no_grad():
            token_A, expert_A = torch.nonzero(probs_TE >= self.threshold.to(probs_TE.dtype), as_tuple=True)
        return token_A, expert_A, probs_TE[token_A, expert_A]

    @torch.no_grad()
    def on_optimizer_step(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold this step's mean C-th largest score per expert into the EMA thresholds τ (module docstring)."""
        acc = torch.cat([self._kth_sum, self._kth_count.view(1)])
        if all_reduce is not None:
            acc = all_reduce(acc)
        kth_sum_E, count = acc[:-1], acc[-1]
        self._kth_sum.zero_()
        self._kth_count.zero_()
        if count <= 0:
            return
        mean_E = (kth_sum_E / count).to(self.threshold.dtype)
        if int(self.threshold_updates) == 0:
            self.threshold.copy_(mean_E)
        else:
            self.threshold.mul_(self.threshold_momentum).add_(mean_E, alpha=1 - self.threshold_momentum)
        self.threshold_updates += 1
