"""DeepSeek-V3 sigmoid gating ("DeepSeek-V3 Technical Report", 2024, §2.1.2) with auxiliary-loss-free load
balancing (Wang et al. 2024), optional group-limited routing and the sequence-wise auxiliary loss
(docs/routers.md#sigmoid).

Shape legend: T tokens, D model width, E experts, K = top_k slots per token, G expert groups,
B sequences (T = B·S), A assignments.

    s  = σ(W x)                                       scores, in fp32
    s̃  = s + b                                        b: per-expert bias, fp32 buffer, selection only
    group-limited: keep the topk_groups best of n_groups contiguous groups (score = sum of the top-2 s̃,
                   or max s̃ without a bias); every other expert's s̃ becomes −inf (not 0: s̃ may be < 0)
    I  = TopK(s̃, K)
    w  = route_scale · s_I / Σ s_I                    from the UNBIASED s (HF and vLLM both had to fix this)

After each optimizer step ``b_e ← b_e + u · sign(mean(c) − c_e)``, with ``c`` the assignments per expert
counted over every training forward since the last step (all micro-batches) and summed over the
data-parallel ranks, so that every replica keeps the same ``b`` and routes alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe.routing.base import Routing
from moe.routing.token_choice import TokenChoiceRouter, token_choice_routing, topk_indices


@dataclass(kw_only=True)
class SigmoidOptions:
    """``router.options`` of the ``sigmoid`` router; defaults are DeepSeek-V3's except the groups."""

    # Multiplies the normalised weights (V3: 2.5). Forgetting it changes the output scale 2.5-fold.
    route_scale: float = 2.5
    # Group-limited routing: E splits into n_groups contiguous groups and each token may only use experts of
    # its topk_groups best groups. V3 uses 8 / 4 with E = 256; 1 / 1 (off) here because it depends on E.
    n_groups: int = 1
    topk_groups: int = 1
    # Auxiliary-loss-free balancing (Wang et al. 2024): a per-expert selection bias, updated after each optimizer step.
    loss_free_bias: bool = True
    # u of the update b ← b + u·sign(mean(c) − c). V3: 1e-3 (0 for its last 500B tokens: b frozen, still used).
    bias_update_rate: float = 1e-3
    # α of the sequence-wise balance loss α·Σ_e f_e·P_e, averaged over sequences (V3: 1e-4; 0 disables it).
    seq_aux_loss_coef: float = 1e-4

    def __post_init__(self) -> None:
        if not self.route_scale > 0:
            raise ValueError(f"router.options.route_scale must be > 0, got {self.route_scale}")
        if self.n_groups < 1:
            raise ValueError(f"router.options.n_groups must be >= 1, got {self.n_groups}")
        if not 1 <= self.topk_groups <= self.n_groups:
            raise ValueError(
                f"router.options.topk_groups must be between 1 and router.options.n_groups={self.n_groups}, "
                f"got {self.topk_groups}"
            )
        if self.bias_update_rate < 0:
            raise ValueError(f"router.options.bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if self.seq_aux_loss_coef < 0:
            raise ValueError(f"router.options.seq_aux_loss_coef must be >= 0, got {self.seq_aux_loss_coef}")


class SigmoidRouter(TokenChoiceRouter):
    """Sigmoid scores, optional group limit and selection bias, weights normalised over the selected experts.

    Args:
        renormalize: divide the selected scores by their sum (V3); False gives ``route_scale · s``.
        aux_loss_coef: α of the batch-wise Switch load-balancing loss on the sum-normalised scores
            (0, the default here, disables it; V3 relies on the bias and the tiny sequence-wise loss instead).
        z_loss_coef: must be 0: the z-loss is defined for softmax routers only.
        options: the settings of ``SigmoidOptions``.
        hidden_size, num_experts, top_k, lb_f_normalization, capacity_factor, eval_capacity_factor, min_capacity,
        init_std, jitter, jitter_eps: as for ``TokenChoiceRouter`` (``top_k`` is required; V3 is dropless;
            ``gumbel`` jitter perturbs the logits of the selection only).
    """

    Options = SigmoidOptions

    def __init__(self, *, renormalize: bool = True, aux_loss_coef: float = 0.0, **kwargs) -> None:
        # The checks below come after the common ones (top_k first), as they read the checked top_k.
        super().__init__(aux_loss_coef=aux_loss_coef, **kwargs)
        opts, E, top_k = self.options, self.num_experts, self.top_k
        if self.z_loss_coef != 0:
            raise ValueError(
                f"router.z_loss_coef must be 0 for the sigmoid router (the z-loss is defined for softmax routers "
                f"only), got {self.z_loss_coef}"
            )
        if E % opts.n_groups:
            raise ValueError(f"router.options.n_groups={opts.n_groups} must divide moe.num_experts={E}")
        group_size = E // opts.n_groups
        if opts.topk_groups * group_size < top_k:
            raise ValueError(
                f"router.options.topk_groups={opts.topk_groups} keeps {opts.topk_groups * group_size} experts, "
                f"fewer than router.top_k={top_k}"
            )
        if opts.n_groups > 1 and opts.loss_free_bias and group_size < 2:
            raise ValueError(
                f"router.options.n_groups={opts.n_groups} leaves {group_size} expert per group; with the "
                "loss-free bias a group's score is the sum of its top-2 scores, so groups need >= 2 experts"
            )
        self.renormalize = renormalize
        if opts.loss_free_bias:
            # A buffer, not a parameter: no gradient, in no optimizer group, no weight decay, saved in the
            # state dict under DeepSeek's name. fp32 always (see _apply): updates of 1e-3 vanish in bf16
            # next to values near 2, which released V3 biases have.
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.register_buffer("e_score_correction_bias", None)
        # Assignments per expert over the training forwards since the last optimizer step. Not a buffer: it is
        # not saved, and DDP's buffer broadcast would overwrite each rank's own count with rank 0's.
        self.load_since_step = torch.zeros(E, dtype=torch.int64)

    def _apply(self, fn, recurse: bool = True):
        # NOTE: model.to(torch.bfloat16) / .half() / .double() would cast the bias like any float buffer
        # (vLLM PR 23640; docs/routers.md#sigmoid). Follow the device move, keep the fp32 values.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if bias is not None and moved is not None and moved.dtype != torch.float32:
            self._buffers["e_score_correction_bias"] = moved.float() if bias.is_meta else bias.to(moved.device)
        device = self.weight.device
        if self.load_since_step.device != device:
            load = self.load_since_step
            self.load_since_step = torch.zeros_like(load, device=device) if load.is_meta else load.to(device)
        return self

    def _limit_groups(self, sel_TE: torch.Tensor) -> torch.Tensor:
        """Set the selection score of every expert outside the token's topk_groups best groups to −inf."""
        T, E = sel_TE.shape
        G = self.options.n_groups
        sel_TGM = sel_TE.view(T, G, E // G)
        if self.e_score_correction_bias is not None:
            group_TG = sel_TGM.topk(2, dim=-1).values.sum(-1)  # only values are used, so ties do not matter
        else:
            group_TG = sel_TGM.amax(dim=-1)
        groups_TK = topk_indices(group_TG, self.options.topk_groups)
        keep_TG = torch.zeros(T, G, dtype=torch.bool, device=sel_TE.device).scatter_(1, groups_TK, True)
        # −inf, not 0: with the bias, s̃ can be negative everywhere and masked experts would then win.
        return sel_TGM.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                seq_len: int | None = None) -> Routing:
        E, K = self.num_experts, self.top_k
        bias_E = self.e_score_correction_bias
        logits_TE = self.router_logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        with torch.no_grad():
            sel_TE = torch.sigmoid(self.jitter.selection(logits_TE))
            if bias_E is not None:
                sel_TE = sel_TE + bias_E.to(logits_TE.dtype)  # the bias chooses, it never weighs
            if self.options.n_groups > 1:
                sel_TE = self._limit_groups(sel_TE)
            indices_TK = topk_indices(sel_TE, K)
        weights_TK = scores_TE.gather(1, indices_TK)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = self.options.route_scale * weights_TK
        # The distribution the balance losses use: sum-normalised scores s' (docs/routers.md#load-balancing).
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)

        with torch.no_grad():
            selected_E = torch.bincount(indices_TK.reshape(-1), minlength=E)
            if bias_E is not None and self.training:
                # Every training forward counts (gradient accumulation), whether or not capacity drops it.
                # NOTE: a forward recomputed by activation checkpointing counts twice; the sign update does not
                # notice as long as every micro-batch is recomputed alike.
                self.load_since_step += selected_E
            mean = selected_E.float().mean()
            max_violation = (selected_E.max().float() - mean) / mean.clamp(min=1e-9)

        own: dict[str, torch.Tensor] = {}
        if self.options.seq_aux_loss_coef > 0:
            seq_lb = sequence_load_balancing_loss(probs_TE, indices_TK, E, seq_len)
            own["seq_load_balancing"] = self.options.seq_aux_loss_coef * seq_lb

        return token_choice_routing(
            indices_TK,
            weights_TK,
            probs_TE,
            num_experts=E,
            capacity_factor=self.active_capacity_factor,
            min_capacity=self.min_capacity,
            losses=self.auxiliary_losses(probs_TE, indices_TK, logits_TE, own=own),
            extra_stats={"max_violation": max_violation},
        )

    @torch.no_grad()
    def on_optimizer_step(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``b_e ← b_e + u · sign(mean(c) − c_e)`` from the load since the last step, summed over the ranks.

        Every rank must call this (the all-reduce is collective), also when it saw no tokens. With no load
        at all, ``mean(c) − c = 0`` and ``b`` stays as it is.
        """
        if self.e_score_correction_bias is None:
            return
        load_E = self.load_since_step.clone()
        if all_reduce is not None:
            load_E = all_reduce(load_E)
        self.load_since_step.zero_()
        # sign(mean(c) − c_e) = sign(Σc − E·c_e), exact in integers.
        direction_E = torch.sign(load_E.sum() - self.num_experts * load_E).to(torch.float32)
        self.e_score_correction_bias.add_(direction_E, alpha=self.options.bias_update_rate)


def sequence_load_balancing_loss(
    probs_TE: torch.Tensor, indices_TK: torch.Tensor, num_experts: int, seq_len: int | None
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss ``mean_b Σ_e f_be · P_be`` (multiply by α outside).

    ``f_be = E/(K·S) · #{t in sequence b : e ∈ I_t}`` (no gradient; 1 for every expert at balance) and
    ``P_be = mean_t s'_te`` over the sequence, so the loss is 1 at perfect balance.

    Args:
        probs_TE: (T, E) sum-normalised scores s'.
        indices_TK: (T, K) the selected experts (before any capacity drop).
        num_experts: E.
        seq_len: S, with T = B·S batch-major; None treats the T tokens as one sequence.
    """
    T, K = indices_TK.shape
    S = T if seq_len is None else seq_len
    if S < 1 or T % S:
        raise ValueError(f"seq_len={seq_len} must be >= 1 and divide the {T} tokens routed together")
    B = T // S
    with torch.no_grad():
        counts_BE = torch.zeros(B, num_experts, dtype=probs_TE.dtype, device=probs_TE.device)
        ones_BA = torch.ones(B, S * K, dtype=probs_TE.dtype, device=probs_TE.device)
        counts_BE.scatter_add_(1, indices_TK.reshape(B, S * K), ones_BA)
        f_BE = counts_BE * (num_experts / (K * S))
    P_BE = probs_TE.reshape(B, S, num_experts).mean(dim=1)
    return (f_BE * P_BE).sum(dim=-1).mean()
