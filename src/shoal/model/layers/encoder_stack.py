"""An encoder's layers as one table of pointers, for the kernels' one-call pass (fast mode
with AMX; kernels/csrc/encoder_ops.cpp, shoal_encoder_stack).

Each layer's row names its int8 linears' AMX tiles, scales, biases and smoothing factors and
its two LayerNorms, in the order EncoderField lists them there. The table holds raw data
pointers, so the tensors they point at are kept here too: the stack lives as long as the model
that built it and its weights never move (CPU tensors, no `.to()` after quantization).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

# per linear: tiles, scale, bias (0 when none), the quantizer's smoothing (the down
# projection's input is rotated instead, so it has none)
_LINEARS = (("qkv", True), ("out", True), ("up", True), ("down", False))


class EncoderStack:
    """The table of model/encoder.py's EncoderLayers, all of them with AMX tiles."""

    def __init__(self, layers: Sequence, kernels) -> None:
        self.kernels = kernels
        self._alive: list[torch.Tensor] = []
        rows = [self._row(layer) for layer in layers]
        self.table = torch.tensor(rows, dtype=torch.int64)
        first = layers[0]
        self.sizes = (first.qkv.qweight.shape[1], first.up.qweight.shape[0], first.num_heads)
        self.eps = float(first.attn_norm.eps)
        self.scale = first.head_dim ** -0.5

    def _row(self, layer) -> list[int]:
        row: list[int] = []
        for name, smoothed in _LINEARS:
            linear = getattr(layer, name)
            row += [self._ptr(linear.tiles), self._ptr(linear.scale),
                    0 if linear.bias is None else self._ptr(linear.bias)]
            if smoothed:
                row.append(self._ptr(linear.inv_smooth if linear.inv_smooth is not None
                                     else linear.ones))
            if name == "out":
                row += [self._ptr(layer.attn_norm.weight), self._ptr(layer.attn_norm.bias)]
        return row + [self._ptr(layer.mlp_norm.weight), self._ptr(layer.mlp_norm.bias)]

    def _ptr(self, tensor: torch.Tensor) -> int:
        tensor = tensor.detach()
        if tensor.dtype == torch.float32 or tensor.dtype == torch.int8:
            tensor = tensor.contiguous()
        else:
            raise TypeError(f"encoder stack: unexpected {tensor.dtype} tensor")
        self._alive.append(tensor)
        return tensor.data_ptr()

    def run(self, x: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
        """x [T, hidden] (embeddings after their norm) -> the last layer's output, in place."""
        return self.kernels.encoder_stack(self.table, self.sizes, self.eps, self.scale, runs, x)
