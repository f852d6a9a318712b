"""Auxiliary losses shared by routers (docs/routers.md#load-balancing, #z-loss). Each is computed for one layer.

Shape legend: T tokens, E experts, K slots per token.
"""

from __future__ import annotations

from typing import Literal

import torch

LBNormalization = Literal["assignments", "first_choice", "tokens"]


def load_balancing_loss(
    probs_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    num_experts: int,
    normalization: LBNormalization = "assignments",
) -> torch.Tensor:
    """Switch load-balancing loss ``E · Σ_e f_e · P_e`` for one layer (multiply by α outside).

    ``f`` comes from the routing decision before capacity dropping and carries no gradient; ``P`` is the
    mean router probability and carries it. With ``"assignments"`` (Σf = 1) the minimum is 1 at perfect
    balance; with ``"tokens"`` (Σf = k, the HF Mixtral form) it is k; ``"first_choice"`` counts only top-1.

    NOTE: call this per layer and sum over layers. Pooling the logits of all layers before computing
    f and P (as HF's ``load_balancing_loss_func`` does) can look balanced while every layer has collapsed.

    Args:
        probs_TE: (T, E) router probabilities, fp32.
        indices_TK: (T, K) chosen experts before dropping; -1 marks an empty slot.
        num_experts: E.
        normalization: how f is normalised (docs/routers.md#load-balancing).
    Returns:
        scalar fp32 tensor (float64 for float64 probabilities).
    """
    T = indices_TK.shape[0]
    dtype = torch.promote_types(probs_TE.dtype, torch.float32)  # fp32, or float64 for exact tests
    with torch.no_grad():
        chosen_TK = indices_TK[:, :1] if normalization == "first_choice" else indices_TK
        valid = chosen_TK >= 0
        counts_E = torch.bincount(chosen_TK[valid], minlength=num_experts).to(dtype)
        # "assignments" divides by the assignments actually chosen: T·K for fixed-k routers, and the variable
        # count for adaptive / top-p ones (their empty -1 slots are not assignments), so that Σf = 1.
        denom = valid.sum().clamp(min=1) if normalization == "assignments" else max(T, 1)
        f_E = counts_E / denom
    P_E = probs_TE.to(dtype).mean(dim=0)
    return num_experts * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t (logsumexp_e z_te)²`` (ST-MoE); multiply by β outside."""
    return torch.logsumexp(logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)), dim=-1).square().mean()
