"""Auxiliary losses shared by routers (ROUTERS.md §0.4). Each is computed for one layer.

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
        normalization: how f is normalised (ROUTERS.md §0.4a).
    Returns:
        scalar fp32 tensor.
    """
    T, K = indices_TK.shape
    with torch.no_grad():
        chosen_TK = indices_TK[:, :1] if normalization == "first_choice" else indices_TK
        valid = chosen_TK >= 0
        counts_E = torch.bincount(chosen_TK[valid], minlength=num_experts).float()
        denom = T * (K if normalization == "assignments" else 1)
        f_E = counts_E / max(denom, 1)
    P_E = probs_TE.float().mean(dim=0)
    return num_experts * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t (logsumexp_e z_te)²`` (ST-MoE); multiply by β outside."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
