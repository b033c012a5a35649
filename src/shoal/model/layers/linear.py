"""Linear layers in two compute modes: exact (float weights) and fast (int8 x int8).

Both keep a row's result independent of the other rows in the batch, so a
request's greedy output does not change with the company it keeps:
- exact: float weights through F.linear (the mode reference tests use), or on the CPU with
  float32 weights through the C++ kernel, which computes each output element in one fixed
  order whatever the batch (kernels/csrc/f32_linear.cpp);
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


# NOTE: up to this many rows, the C++ matrix-vector kernel streams the weights faster than
# torch._int_mm (measured: 6.2 vs 9.5 ms per SmolLM2 decode step at one row, on par at 3).
SMALL_BATCH_ROWS = 2


def int8_matmul(xq: torch.Tensor, qweight: torch.Tensor, kernels=None) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> int32 [M, N]; bit-identical whichever kernel runs."""
    if kernels is not None and xq.shape[0] <= SMALL_BATCH_ROWS:
        return kernels.int8_matmul_small(xq, qweight)
    return torch._int_mm(xq, qweight.t())


def int8_products(xq: torch.Tensor, linear: nn.Module, kernels=None) -> torch.Tensor:
    """xq int8 [M, K] times an int8 layer's weight: int32 [M, N]; on AMX tiles when the layer
    has them (pack_tiles), else int8_matmul. The same integers either way."""
    if linear.tiles is not None:
        return kernels.int8_gemm(xq, linear.tiles)
    return int8_matmul(xq, linear.qweight, kernels)


def pack_tiles(linear: nn.Module, kernels) -> bool:
    """Gives an int8 layer its weight as kernels.int8_gemm's AMX tiles where the kernels can
    run them and the shape fits; True if it has them."""
    if kernels is None or not kernels.int8_gemm_ready or not kernels.int8_gemm_fits(*linear.qweight.shape):
        return False
    linear.tiles = kernels.int8_gemm_pack(linear.qweight)
    return True


def int8_linear_fused(xq: torch.Tensor, xs: torch.Tensor, qweight: torch.Tensor,
                      scale: torch.Tensor, bias: torch.Tensor, kernels) -> torch.Tensor:
    """Fast mode's fused path: int8 rows (row scales xs) through an int8 weight, dequantized
    (+ bias); one kernel call at decoding batch sizes, the same bits either way."""
    if xq.shape[0] <= SMALL_BATCH_ROWS:
        return kernels.int8_linear_small(xq, xs, qweight, scale, bias)
    return kernels.dequant_rows(torch._int_mm(xq, qweight.t()), xs, scale, bias)


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
        self.kernels = None   # CPU kernels, set by enable_f32_kernel (float32 weights only)

    def enable_f32_kernel(self, kernels) -> None:
        """Routes float32 CPU inputs through the batch-invariant C++ kernel.

        NOTE: MKL's sgemm sums in an order that changes with the number of rows (a row's
        result alone differs from the same row among 3 others), and at decoding sizes it
        streams the weights at a fraction of the memory bandwidth."""
        if self.weight.dtype == torch.float32 and self.weight.device.type == "cpu":
            self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            shape = x.shape
            out = self.kernels.f32_linear(x.reshape(-1, shape[-1]), self.weight, self.bias)
            return out.reshape(*shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


class Int8Linear(nn.Module):
    """y ≈ x W^T + b with int8 weights (per output channel) and int8 activations (per row).

    `smooth` (SmoothQuant) moves activation outliers into the weights: the layer
    computes (x / s) (W s)^T, which equals x W^T, but x / s has no channel that
    dwarfs the others, so one int8 scale per row loses far less.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = weight.float()
        if smooth is not None:
            weight = weight * smooth[None, :]
        q, scale = quantize_rows_int8(weight)
        self.register_buffer("qweight", q)          # [N, K]
        self.register_buffer("scale", scale)        # [N]
        self.register_buffer("bias", None if bias is None else bias.float())
        self.register_buffer("smooth", None if smooth is None else smooth.float())
        self.register_buffer("inv_smooth", None if smooth is None else (1.0 / smooth).float())
        self.kernels = None   # CPU kernels, set with the fused path (small-batch matmul)
        self.tiles = None     # qweight as AMX tiles (pack_tiles), for passes on the work pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.inv_smooth is not None:
            x2 = x2 * self.inv_smooth
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
        xq = torch.round(x2 / x_scale).to(torch.int8)
        acc = int8_products(xq, self, self.kernels)
        y = acc.to(torch.float32).mul_(x_scale).mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], -1)

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The float rows of W for the given indices (embedding lookup on a tied head)."""
        rows_f = self.qweight[rows].to(torch.float32) * self.scale[rows, None]
        if self.smooth is not None:
            rows_f = rows_f / self.smooth
        return rows_f


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """A float linear layer; fast mode converts these after calibration (layers.quantize)."""
    return ExactLinear(weight.to(dtype), None if bias is None else bias.to(dtype))
