"""Rotary position embeddings (Hugging Face "rotate half" layout) with Llama's scalings."""
from __future__ import annotations

import math

import torch


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies, adjusted by the config's rope_scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(medium, blended, scaled)
    # NOTE: unknown scalings are refused at config time; this is a last guard.
    raise ValueError(f"unsupported rope scaling {kind!r}")


class RotaryEmbedding:
    """Precomputed cos/sin tables indexed by absolute position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict | None, device: torch.device | str = "cpu",
                 freq_factors: tuple[float, ...] | None = None) -> None:
        inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
        if freq_factors is not None:
            # llama.cpp's Llama 3 files carry the scaling as per-frequency divisors.
            inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float64)
        positions = torch.arange(max_positions, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq)                  # [P, hd/2]
        angles = torch.cat([angles, angles], dim=-1)               # [P, hd]
        self.cos = angles.cos().to(torch.float32).to(device)
        self.sin = angles.sin().to(torch.float32).to(device)
        self.half = head_dim // 2

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for the given positions, shaped [T, 1, hd] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, hd] -> rotated x (same dtype)."""
        x1, x2 = x[..., : self.half], x[..., self.half:]
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)
