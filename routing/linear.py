"""The linear gate that every learned router scores with: logits ``z = W x``, in fp32, with router noise.

Shape legend: T tokens, D model width, E experts.

``W`` is the parameter ``weight`` of shape (E, D), like ``nn.Linear`` without a bias. Its name is part of the
checkpoint and HF export format (``...router.weight``), so subclasses must not rename it.
"""

from __future__ import annotations

import torch
from torch import nn

from moe.routing.base import Router, router_dtype
from moe.routing.jitter import Jitter


class LinearRouter(Router):
    """Base class of the routers whose scores are the logits of one linear map: it owns ``W``, its init and
    the router noise on its input and logits. Subclasses add the routing rule (``forward``) and ``from_config``.

    Args:
        hidden_size: D.
        num_experts: E.
        init_std: std of the normal init of ``W``.
        jitter: training-only noise, one of ``moe.routing.jitter.JITTERS`` (docs/routers.md#jitter).
        jitter_eps: its ε.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        init_std: float = 0.02,
        jitter: str = "none",
        jitter_eps: float = 1e-2,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.init_std = init_std
        self.jitter = Jitter(jitter, jitter_eps)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))  # (E, D), like nn.Linear
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def router_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The logits the router works with: ``W x`` with ``input_jitter`` and ``logit_mult_jitter`` applied
        (in training); ``gumbel`` is the caller's, through ``self.jitter.selection``, as it only chooses.

        Args:
            x_TD: (T, D) the layer input, any float dtype; the router never modifies it.
        Returns:
            logits_TE: (T, E) in fp32 (float64 for float64 inputs, so that gradients can be checked exactly).
        """
        # NOTE: router maths in fp32 (Switch Transformer): bf16 logits create ties and wrong top-k choices.
        # Autocast is switched off here, or it would run the matmul in bf16 again. The maths that follows on
        # these fp32 logits (softmax, sort, cumsum, sigmoid, ...) needs no guard: autocast lowers only
        # matmul-like ops, and leaves fp32 inputs of every other op in fp32.
        dtype = router_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            # input_jitter makes a jittered copy for the router only; the experts keep x_TD.
            xr_TD = self.jitter.router_input(x_TD.to(dtype))
            return self.jitter.logits(nn.functional.linear(xr_TD, self.weight.to(dtype)))
