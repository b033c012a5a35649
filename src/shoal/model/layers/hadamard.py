"""An int8 linear behind a Walsh-Hadamard rotation, for inputs whose outliers one int8
scale per row cannot hold.

Fast mode quantizes each activation row with one scale. Where a few channels of a row dwarf
the others (an encoder's GELU output: which channels depends on the token, so SmoothQuant's
fixed per-channel factors cannot even them out), that scale flattens every other value to a
few levels. Rotating the row first spreads each outlier over 32 values; the weights are
rotated the same way once at load, so the product is unchanged: (H x) . (H w) / 32 = x . w,
since the +-1 Hadamard matrix H of order 32 is symmetric with H H = 32 I.

The rotation mixes the 32 contiguous chunks of a row (K = 32 C), not 32 neighbouring
values: every butterfly is then an add over a contiguous chunk, which vectorizes.
Measured on all-MiniLM-L6-v2's feed-forward output projection against sentence-transformers
(520 sentences): worst cosine 0.9968 with this layer, 0.9920 with a SmoothQuant per-row int8
one, 0.9972 with the layer left in float32; about a fifth of float32's time at 1,024 rows.
"""
from __future__ import annotations

import torch
from torch import nn

from shoal.model.layers.linear import int8_matmul, int8_products, quantize_rows_int8

ORDER = 32


def hadamard_chunks_torch(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] with its 32 chunks mixed by the unnormalised Hadamard transform: the
    kernel's butterflies (kernels/csrc/fused_ops.cpp, shoal_hadamard_quant_rows) in its order,
    so the floats are bit-identical."""
    t, k = x.shape
    y = x.float().reshape(t, ORDER, k // ORDER)
    h = 1
    while h < ORDER:
        pairs = y.reshape(t, ORDER // (2 * h), 2, h, k // ORDER)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack([a + b, a - b], dim=2).reshape(t, ORDER, k // ORDER)
        h *= 2
    return y.reshape(t, k)


def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' per-row quantizer (fused_ops.cpp quantize_row), bit for bit."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.round(x * (1.0 / scale)).clamp_(-127, 127).to(torch.int8)
    return q, scale


class HadamardInt8Linear(nn.Module):
    """y ≈ x W^T + b: the rotated x quantized per row, times W rotated and quantized per
    output channel, both int8, summed exactly in int32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.shape[1] % ORDER:
            raise ValueError(f"input width {weight.shape[1]} is not a multiple of {ORDER}")
        q, scale = quantize_rows_int8(hadamard_chunks_torch(weight.float()) / ORDER)
        self.register_buffer("qweight", q)          # [N, K]
        self.register_buffer("scale", scale)        # [N]
        self.register_buffer("bias", None if bias is None else bias.float())
        self.kernels = None   # the C++ kernels, when fast mode has them
        self.tiles = None     # qweight as AMX tiles (linear.pack_tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        if self.kernels is not None:
            return self.forward_quantized(*self.kernels.hadamard_quant_rows(x2)).reshape(
                *shape[:-1], -1)
        xq, xs = quantize_rows_torch(hadamard_chunks_torch(x2))
        y = int8_matmul(xq, self.qweight).to(torch.float32).mul_(xs).mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], -1)

    def forward_quantized(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """From rows already rotated and quantized (the kernels' fused GELU path)."""
        acc = int8_products(xq, self, self.kernels)
        bias = self.bias if self.bias is not None else self.scale[:0]
        return self.kernels.dequant_rows(acc, xs, self.scale, bias)
