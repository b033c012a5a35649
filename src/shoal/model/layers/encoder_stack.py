"""An encoder's layers as one table of pointers, for the kernels' one-call pass (fast mode
with AMX; kernels/csrc/encoder_ops.cpp, shoal_encoder_stack and shoal_encoder_pass).

Each layer's row names its int8 linears' AMX tiles, scales, biases and smoothing factors and
its two LayerNorms, in the order EncoderField lists them there. The table holds raw data
pointers, so the tensors they point at are kept here too: the stack lives as long as the model
that built it and its weights never move (CPU tensors, no `.to()` after quantization).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

# the pooling codes of shoal_encoder_pass
_POOLING = {"mean": 0, "cls": 1, "last": 2, "max": 3}
# per linear: tiles, scale, bias (0 when none), the quantizer's smoothing (the down
# projection's input is rotated instead, so it has none)
_LINEARS = (("qkv", True), ("out", True), ("up", True), ("down", False))


class EncoderStack:
    """The table of model/encoder.py's EncoderLayers, all of them with AMX tiles."""

    def __init__(self, layers: Sequence, kernels, embeddings: dict[str, torch.Tensor],
                 pooling: str, normalize: bool) -> None:
        """`embeddings`: the word, position and type-0 tables and the embedding norm's
        norm_weight and norm_bias; `pooling` and `normalize` as the model's EncoderConfig."""
        self.kernels = kernels
        self._alive: list[torch.Tensor] = []
        rows = [self._row(layer) for layer in layers]
        self.table = torch.tensor(rows, dtype=torch.int64)
        first = layers[0]
        self.sizes = (first.qkv.qweight.shape[1], first.up.qweight.shape[0], first.num_heads)
        self.eps = float(first.attn_norm.eps)
        self.scale = first.head_dim ** -0.5
        self.vocab_size, self.max_positions = (embeddings["word"].shape[0],
                                               embeddings["position"].shape[0])
        self.model = torch.tensor([self._ptr(embeddings[name]) for name in
                                   ("word", "position", "type0", "norm_weight", "norm_bias")]
                                  + [_POOLING[pooling], int(normalize)], dtype=torch.int64)

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

    def run_pass(self, inputs: Sequence[Sequence[int]], runs: list[tuple[int, int, int]]) -> torch.Tensor:
        """Token ids of inputs ordered by length (`runs` groups them) -> pooled [B, hidden]."""
        ids = [t for seq in inputs for t in seq]
        # the C side reads the tables at these rows unchecked
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        if runs[-1][2] > self.max_positions:
            raise ValueError(f"an input of {runs[-1][2]} tokens is longer than the model's "
                             f"{self.max_positions} positions")
        return self.kernels.encoder_pass(self.model, self.table, self.sizes, self.eps, self.scale,
                                         torch.tensor(ids, dtype=torch.int64), runs, len(inputs))

    def run(self, x: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
        """The layers alone: x [T, hidden] (embeddings after their norm) -> the last layer's
        output, in place (tests hold it against the per-op pass)."""
        return self.kernels.encoder_stack(self.table, self.sizes, self.eps, self.scale, runs, x)
