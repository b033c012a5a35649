"""Sizing and allocating the paged KV cache tensors."""
from __future__ import annotations

import os

import torch

from shoal.models.config import ModelConfig

# NOTE: CPU default: a fifth of the memory that is free now, capped at 4 GiB. Pages
# are committed only when a block is first written, so an idle server's RSS stays low.
_CPU_FRACTION = 0.2
_CPU_CAP = 4 << 30
# CUDA default: most of what is free after the weights are on the device.
_CUDA_FRACTION = 0.8


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element


def default_kv_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * _CUDA_FRACTION)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 8 << 30
    return int(min(available * _CPU_FRACTION, _CPU_CAP))


def allocate_kv_caches(config: ModelConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (K, V) pair per layer, each [num_blocks * block_size, kv_heads, head_dim]."""
    shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
    # NOTE: torch.empty, not zeros: untouched blocks cost no physical memory on CPU.
    # Reads are always masked to written slots, so garbage is never attended to.
    caches = []
    for _ in range(config.num_layers):
        k = torch.empty(shape, dtype=dtype, device=device)
        v = torch.empty(shape, dtype=dtype, device=device)
        k[:block_size].zero_()  # block 0: the padding target of gathered reads
        v[:block_size].zero_()
        caches.append((k, v))
    return caches
