"""Fast mode on GGUF's own 4/8-bit blocks: weights stay packed, activations become int8 per block.

The llama.cpp recipe (its q4_1 x q8_1 dot products): a Q4_0 / Q4_1 / Q8_0 weight keeps the
file's blocks of 32 values with their fp16 scale (and min), only reordered once at load into
tiles the C++ kernel reads fastest (kernels/csrc/packed_linear.cpp describes the layout);
each activation row is quantized per 32-element block to int8 with a float scale and the
integer sum of the block. No dequantization and no calibration: the weights are exactly the
file's, and the only new rounding is the activations' (per block, far finer than per row).

`packed_linear_torch` is the same arithmetic in PyTorch, bit for bit (the integer block dots
are exact in float32, and the float steps are the kernel's, in its order): the path for
machines without the C++ kernels, and the reference the kernels are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType
from torch import nn

from shoal.model.kernels.cpu import load_cpu_kernels

BLOCK = 32
TILE_ROWS = 8
# GGML type id -> (name, bytes per GGUF block, scales per block: d, or d and min)
Q4_0, Q4_1, Q8_0 = (int(GGMLQuantizationType.Q4_0), int(GGMLQuantizationType.Q4_1),
                    int(GGMLQuantizationType.Q8_0))
PACKED_TYPES = {Q4_0: ("Q4_0", 18, 1), Q4_1: ("Q4_1", 20, 2), Q8_0: ("Q8_0", 34, 1)}


@dataclass
class PackedWeight:
    """A [out, in] weight as the GGUF file's block bytes: `data` is uint8 [out, in / 32 * block]."""

    ggml_type: int
    data: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        _, block_bytes, _ = PACKED_TYPES[self.ggml_type]
        return self.data.shape[0], self.data.shape[1] // block_bytes * BLOCK

    def permute_rows(self, order: torch.Tensor) -> PackedWeight:
        return PackedWeight(self.ggml_type, self.data[order].contiguous())

    @staticmethod
    def cat(parts: list[PackedWeight]) -> PackedWeight:
        types = {p.ggml_type for p in parts}
        if len(types) != 1:
            raise ValueError("packed weights of different types cannot be fused")
        return PackedWeight(parts[0].ggml_type, torch.cat([p.data for p in parts]))


def _values(w: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(values uint8 [N, B, 32] as stored: 0..15 for Q4, the int8 bytes for Q8_0,
    scale fp16 bytes [N, B, 2], min fp16 bytes [N, B, 2] or None)."""
    _, block_bytes, nscales = PACKED_TYPES[w.ggml_type]
    n = w.data.shape[0]
    blocks = w.data.reshape(n, -1, block_bytes)
    qs = blocks[:, :, 2 * nscales:]
    if w.ggml_type == Q8_0:
        vals = qs
    else:   # byte j: element j in the low nibble, element j + 16 in the high one
        vals = torch.cat([qs & 0x0F, qs >> 4], dim=2)
    return vals, blocks[:, :, :2], blocks[:, :, 2:4] if nscales == 2 else None


def repack(w: PackedWeight) -> torch.Tensor:
    """The kernel's tiles, uint8 [ceil(N/8), B, tile bytes] (rows padded with zeros to 8)."""
    vals, d, m = _values(w)
    n, nb, _ = vals.shape
    groups = -(-n // TILE_ROWS)
    pad = groups * TILE_ROWS - n

    def tiles(t: torch.Tensor) -> torch.Tensor:   # [N, B, X] -> [G, B, 8, X]
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t
        return t.reshape(groups, TILE_ROWS, nb, -1).transpose(1, 2)

    # value register j holds elements 4j..4j+3 of each row: [G, B, j, row, 4]
    regs = tiles(vals).reshape(groups, nb, TILE_ROWS, 8, 4).transpose(2, 3)
    if w.ggml_type != Q8_0:
        regs = regs[:, :, :4] | (regs[:, :, 4:] << 4)
    parts = [tiles(d).reshape(groups, nb, -1)]
    if m is not None:
        parts.append(tiles(m).reshape(groups, nb, -1))
    parts.append(regs.reshape(groups, nb, -1))
    return torch.cat(parts, dim=2).contiguous()


def unpack(tiles: torch.Tensor, ggml_type: int, n: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of `repack` as numbers: (integer values [N, K] (Q4_0 less 8, Q8_0 signed),
    float32 scales [N, B], float32 mins [N, B] or None)."""
    groups, nb, _ = tiles.shape
    nscales = PACKED_TYPES[ggml_type][2]

    def rows(t: torch.Tensor) -> torch.Tensor:   # [G, B, 8, X] -> [N, B, X]
        return t.transpose(1, 2).reshape(groups * TILE_ROWS, nb, -1)[:n]

    def half(offset: int) -> torch.Tensor:
        raw = tiles[:, :, offset:offset + 16].reshape(groups, nb, TILE_ROWS, 2)
        return rows(raw).contiguous().view(torch.float16).to(torch.float32).reshape(n, nb)

    d = half(0)
    m = half(16) if nscales == 2 else None
    regs = tiles[:, :, 16 * nscales:]
    if ggml_type == Q8_0:
        regs = regs.reshape(groups, nb, 8, TILE_ROWS, 4).contiguous().view(torch.int8).to(torch.int32)
    else:
        regs = regs.reshape(groups, nb, 4, TILE_ROWS, 4).to(torch.int32)
        regs = torch.cat([regs & 0x0F, regs >> 4], dim=2)
        if ggml_type == Q4_0:
            regs = regs - 8
    vals = rows(regs.transpose(2, 3).reshape(groups, nb, TILE_ROWS, 8, 4).reshape(
        groups, nb, TILE_ROWS, BLOCK))
    return vals.reshape(n, nb * BLOCK), d, m


def quant_blocks_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' per-block activation quantizer: int8 [T, K], scales [T, K/32], sums [T, K/32]."""
    t, k = x.shape
    xb = x.float().reshape(t, k // BLOCK, BLOCK)
    d = xb.abs().amax(dim=2) / 127.0
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.round(xb * inv[:, :, None]).clamp_(-127, 127)
    return (q.to(torch.int8).reshape(t, k), d, q.sum(dim=2).to(torch.int32))


def packed_linear_torch(q: torch.Tensor, d: torch.Tensor, s: torch.Tensor, ggml_type: int,
                        values_t: torch.Tensor, dw: torch.Tensor, mw: torch.Tensor | None,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's arithmetic: values_t = the weight's integer values as float [B, 32, N],
    dw / mw [B, N]. Block dots are integers below 2^24, so float matmul gives them exactly."""
    m, k = q.shape
    nb = k // BLOCK
    xq = q.to(torch.float32).reshape(m, nb, BLOCK).transpose(0, 1)    # [B, M, 32]
    dots = torch.bmm(xq, values_t)                                     # [B, M, N]
    dx = d.t()[:, :, None]                                             # [B, M, 1]
    t = dots * (dw[:, None, :] * dx)
    if mw is not None:
        t = t + mw[:, None, :] * (dx * s.t().to(torch.float32)[:, :, None])
    acc = torch.zeros(m, values_t.shape[2])
    for b in range(nb):          # NOTE: one block at a time: the kernel's order of sums
        acc = acc + t[b]
    return acc if bias is None else acc + bias


class PackedLinear(nn.Module):
    """y ≈ x W^T + b with W in GGUF blocks (Q4_0, Q4_1, Q8_0) and x quantized per block."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.ggml_type not in PACKED_TYPES:
            raise ValueError(f"GGML type {weight.ggml_type} cannot stay packed")
        self.ggml_type = weight.ggml_type
        self.out_features, self.in_features = weight.shape
        kernels = load_cpu_kernels()
        if kernels is not None:   # one C++ pass: the PyTorch shuffles took seconds per model
            n, k = weight.shape
            tile = 16 * PACKED_TYPES[weight.ggml_type][2] + (256 if weight.ggml_type == Q8_0 else 128)
            tiles = kernels.packed_repack(weight.ggml_type, weight.data, -(-n // TILE_ROWS),
                                          k // BLOCK, tile)
        else:
            tiles = repack(weight)
        self.register_buffer("tiles", tiles)
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.kernels = None        # the C++ kernels once the runner has them
        self._twin: tuple | None = None   # float values and scales for the PyTorch path

    @property
    def type_name(self) -> str:
        return PACKED_TYPES[self.ggml_type][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        if self.kernels is not None:
            q, d, s = self.kernels.quant_blocks(x2)
        else:
            q, d, s = quant_blocks_torch(x2)
        return self.forward_quantized(q, d, s).reshape(*shape[:-1], -1)

    def forward_quantized(self, q: torch.Tensor, d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """From rows already quantized per block (the fused path's norm + quantize kernels)."""
        if self.kernels is not None:
            return self.kernels.packed_linear(self.ggml_type, self.tiles, self.out_features,
                                              self.in_features, q, d, s, self.bias)
        if self._twin is None:
            # NOTE: the PyTorch path holds float copies (exact mode's memory), built on first use.
            vals, dw, mw = unpack(self.tiles, self.ggml_type, self.out_features)
            nb = self.in_features // BLOCK
            values_t = vals.to(torch.float32).reshape(-1, nb, BLOCK).permute(1, 2, 0).contiguous()
            self._twin = (values_t, dw.t().contiguous(), None if mw is None else mw.t().contiguous())
        values_t, dw, mw = self._twin
        return packed_linear_torch(q, d, s, self.ggml_type, values_t, dw, mw, self.bias)

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The float rows of W (as the GGUF dequantizer gives them): embedding lookups on a
        tied head, reading only the tiles of the rows asked for."""
        if self.kernels is not None and rows.device.type == "cpu":
            # NOTE: one kernel pass: the torch ops below cost ~5% of a long prompt's prefill
            return self.kernels.packed_rows(self.ggml_type, self.tiles, self.in_features,
                                            rows).reshape(*rows.shape, self.in_features)
        flat = rows.reshape(-1)
        groups = torch.div(flat, TILE_ROWS, rounding_mode="floor")
        vals, d, m = unpack(self.tiles[groups], self.ggml_type, groups.numel() * TILE_ROWS)
        pick = torch.arange(flat.numel()) * TILE_ROWS + flat % TILE_ROWS
        vals, d = vals[pick].to(torch.float32).reshape(flat.numel(), -1, BLOCK), d[pick, :, None]
        out = d * vals if m is None else (d * vals) + m[pick, :, None]
        return out.reshape(*rows.shape, self.in_features)
