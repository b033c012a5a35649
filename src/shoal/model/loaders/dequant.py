"""Dequantizes raw GGUF tensor bytes to float32 with torch (vectorized, any device).

Each kernel repeats the arithmetic of ggml's reference dequantization in the same order
(separate fp32 multiply and add, never fused), so results match `gguf.quants.dequantize`
bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from shoal.core.errors import CorruptModelError, UnsupportedModelError

Kernel = Callable[[torch.Tensor], torch.Tensor]


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2k) little-endian fp16 bytes -> (n, k) float32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _shifts(values: Sequence[int], like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device).reshape(shape)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Splits bytes into 4-bit values: per run of `group` bytes, all low nibbles, then all high."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group) >> _shifts((0, 4), qs, (1, 1, 2, 1))
    return (q & 0x0F).reshape(n, -1)


def _bits(qh: torch.Tensor, n_bits: int) -> torch.Tensor:
    """(n, b) bytes -> (n, 8b) bits, little-endian: element j is bit j%8 of byte j//8."""
    n = qh.shape[0]
    bits = qh.reshape(n, -1, 1) >> _shifts(range(8), qh, (1, 1, 8))
    return (bits & 1).reshape(n, n_bits)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    x = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return x * d


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 16).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 16).to(torch.float32)
    return (d * q) + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    high = _bits(b[:, 2:6], 32)
    q = (_nibbles(b[:, 6:], 16) | (high << 4)).to(torch.int8) - 16
    return d * q.to(torch.float32)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    high = _bits(b[:, 4:8], 32)
    q = (_nibbles(b[:, 8:], 16) | (high << 4)).to(torch.float32)
    return (d * q) + m


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpacks the 12-byte 6-bit (scale, min) pairs of Q4_K / Q5_K into two (n, 8) tensors."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    scale = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    offset = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32).to(torch.float32)
    return (scale * q - offset).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    scale = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    offset = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    low = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    # NOTE: sub-block s takes its fifth bit from bit s of each of the 32 qh bytes.
    qh = b[:, 16:48].reshape(n, 1, 32) >> _shifts(range(8), b, (1, 8, 1))
    q = (low | ((qh & 1) << 4)).to(torch.float32)
    return (scale * q - offset).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _f16(b[:, 208:210])
    scale = (d * scales).reshape(n, 16, 1)
    low = _nibbles(b[:, :128], 64).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), b, (1, 1, 4, 1))
    q = (low | ((qh & 3).reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (scale * q.reshape(n, 16, 16).to(torch.float32)).reshape(n, 256)


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32).clone()


def _f16_all(b: torch.Tensor) -> torch.Tensor:
    return _f16(b)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    # NOTE: integer route (not .view(bfloat16).float()) so NaN payloads survive exactly.
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


_KERNELS: dict[GGMLQuantizationType, Kernel] = {
    GGMLQuantizationType.F32: _f32,
    GGMLQuantizationType.F16: _f16_all,
    GGMLQuantizationType.BF16: _bf16,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_KERNELS)


def type_name(qtype: GGMLQuantizationType | int) -> str:
    """'Q4_K' for a known GGML type, 'type#<id>' for an id gguf does not know."""
    try:
        return GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"type#{int(qtype)}"


def check_supported(qtype: GGMLQuantizationType | int, tensor_name: str, source: str) -> None:
    """Raises UnsupportedModelError naming the tensor and type unless shoal can dequantize it."""
    try:
        known = GGMLQuantizationType(int(qtype))
    except ValueError:
        known = None
    if known not in _KERNELS:
        raise UnsupportedModelError(
            source, f"tensor {tensor_name!r} has GGML type {type_name(qtype)}, which shoal cannot "
                    f"dequantize (supported: {', '.join(sorted(t.name for t in _KERNELS))})")


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType | int, shape: Sequence[int], *,
               tensor_name: str = "tensor", source: str = "<memory>") -> torch.Tensor:
    """Returns float32 values of `shape` (torch order) from the uint8 block bytes in `raw`.

    Runs on raw's device. The last dimension of `shape` must be a multiple of the type's
    block size, as GGUF requires.
    """
    check_supported(qtype, tensor_name, source)
    qtype = GGMLQuantizationType(int(qtype))
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw bytes must be a uint8 tensor, got {raw.dtype}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    n_elements = math.prod(shape)
    if shape and shape[-1] % block_size != 0:
        raise CorruptModelError(
            source, f"tensor {tensor_name!r}: row length {shape[-1]} is not a multiple of the "
                    f"{qtype.name} block size {block_size}")
    expected = n_elements // block_size * type_size
    if raw.numel() != expected:
        raise CorruptModelError(
            source, f"tensor {tensor_name!r}: {raw.numel()} bytes for {n_elements} {qtype.name} "
                    f"values, expected {expected}")
    blocks = raw.reshape(-1, type_size)
    return _KERNELS[qtype](blocks).reshape(shape)
