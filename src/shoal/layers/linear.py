"""Linear layers in two compute modes: exact (float weights) and fast (int8 x int8).

Both keep a row's result independent of the other rows in the batch, so a
request's greedy output does not change with the company it keeps:
- exact: float weights through F.linear (the mode reference tests use);
- fast: weights quantized per output channel to int8 once at load, activations
  quantized per row (per token) at run time, products summed exactly in int32
  by torch._int_mm. NOTE: PyTorch's dynamic-quantized Linear would be as fast,
  but it picks one activation scale for the whole batch, which would make each
  request's numerics depend on its neighbours.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

COMPUTE_MODES = ("exact", "fast")


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization: returns (int8 [N, K], float32 scale [N])."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


class ExactLinear(nn.Module):
    """y = x W^T + b with the weights kept in their float dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8Linear(nn.Module):
    """y ≈ x W^T + b with int8 weights (per output channel) and int8 activations (per row)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, scale = quantize_rows_int8(weight.float())
        self.register_buffer("qweight", q)          # [N, K]
        self.register_buffer("scale", scale)        # [N]
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
        xq = torch.round(x2 / x_scale).to(torch.int8)
        # NOTE: the transposed view (not a contiguous copy) measured faster for the
        # small-M shapes of decoding on AVX-512 CPUs.
        acc = torch._int_mm(xq, self.qweight.t())
        y = acc.to(torch.float32).mul_(x_scale).mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], -1)

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The float rows of W for the given indices (embedding lookup on a tied head)."""
        return self.qweight[rows].to(torch.float32) * self.scale[rows, None]


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, compute: str,
                dtype: torch.dtype) -> nn.Module:
    """Builds the linear layer for a compute mode; `weight` may be freed by the caller."""
    if compute == "fast" and weight.device.type == "cpu":
        return Int8Linear(weight, bias)
    # NOTE: on CUDA, "fast" means half-precision weights: tensor cores beat int8 here
    # without a custom kernel, and _int_mm on CUDA has shape restrictions.
    w = weight.to(dtype)
    return ExactLinear(w, None if bias is None else bias.to(dtype))
