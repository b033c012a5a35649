"""RMSNorm, computed in float32 whatever the activations' dtype."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight (Llama's normalisation).

    unit_offset: the stored weight w scales by (1 + w), as Gemma's norms do; `weight` then
    holds 1 + w (computed once, in float32, as transformers computes it per call).
    """

    def __init__(self, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        weight = weight.float()
        if unit_offset:
            weight = 1.0 + weight
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight).to(dtype)
