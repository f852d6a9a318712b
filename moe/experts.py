"""Routed experts: E SwiGLU feed-forwards stored as 3-D tensors so one grouped GEMM serves them all.

Shape legend: T tokens, D model width, F expert hidden width, E experts, A assignments (grouped by expert).

Weights are ``[E, in, out]``: ``w_gate_up_ED2F`` holds the gate projection in its first F columns and the
up projection in the last F (the order of ``transformers``' fused ``gate_up_proj``, transposed), and
``w_down_EFD`` the down projection. Export to Hugging Face layouts is then a transpose, not a loop.
"""

from __future__ import annotations

import torch
from torch import nn

from moe.kernels import ops, reference


class Experts(nn.Module):
    """E SwiGLU experts run as two grouped GEMMs.

    Args:
        num_experts: E.
        hidden_size: D.
        expert_hidden_size: F.
        backend: expert backend name (``moe.kernels.backends.BACKENDS`` or ``"auto"``).
        init_std: std of the normal init (the Llama/Mixtral ``initializer_range``).
    """

    def __init__(self, num_experts: int, hidden_size: int, expert_hidden_size: int, backend: str = "auto",
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.expert_hidden_size = expert_hidden_size
        self.backend = backend
        self.init_std = init_std
        self.w_gate_up_ED2F = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * expert_hidden_size))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, expert_hidden_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_gate_up_ED2F, std=self.init_std)
        nn.init.normal_(self.w_down_EFD, std=self.init_std)

    def forward(self, x_TD: torch.Tensor, rows_A: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Expert outputs for grouped assignments.

        Args:
            x_TD: (T, D) token activations.
            rows_A: (A,) token of each assignment, grouped by expert.
            counts_E: (E,) assignments per expert.
        Returns:
            y_AD: (A, D) in the grouped order.
        """
        h_A2F = ops.gather_grouped_mm(x_TD, rows_A, self.w_gate_up_ED2F, counts_E, backend=self.backend)
        a_AF = reference.swiglu(h_A2F)
        return ops.grouped_mm(a_AF, self.w_down_EFD, counts_E, backend=self.backend)

    def forward_combine(self, x_TD: torch.Tensor, rows_A: torch.Tensor, weight_A: torch.Tensor,
                        counts_E: torch.Tensor, grad_scale_A: torch.Tensor | None = None) -> torch.Tensor:
        """``out[rows_A[a]] += weight_A[a] · expert(x_TD[rows_A[a]])``: experts and combine as one block
        (``ops.experts_combine``), (T, D) in the dtype of ``x_TD``."""
        return ops.experts_combine(x_TD, rows_A, weight_A, counts_E, self.w_gate_up_ED2F, self.w_down_EFD,
                                   grad_scale_A=grad_scale_A, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"expert_hidden_size={self.expert_hidden_size}, backend={self.backend!r}")
