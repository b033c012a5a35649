"""Sizing and allocating the paged KV cache tensors."""
from __future__ import annotations

import os

import torch

from shoal.model.config import ModelConfig

# NOTE: CPU default: a fifth of the memory that is free now, capped at 4 GiB. Pages
# are committed only when a block is first written, so an idle server's RSS stays low
# (SHOAL_KV_CACHE_COMMIT=1 commits them all at load instead).
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
                       dtype: torch.dtype, device: torch.device, blocked: bool = False,
                       commit: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (K, V) pair per layer; `commit` writes every page now (see SHOAL_KV_CACHE_COMMIT).

    flat (PyTorch attention): K and V are [num_blocks * block_size, kv_heads, head_dim].
    blocked (the C++ kernel): K is [num_blocks, kv_heads, head_dim, block_size] and V is
    [num_blocks, kv_heads, block_size, head_dim] (see csrc/paged_attention.cpp).
    """
    kv, hd = config.num_kv_heads, config.head_dim
    if blocked:
        k_shape = (num_blocks, kv, hd, block_size)
        v_shape = (num_blocks, kv, block_size, hd)
    else:
        k_shape = v_shape = (num_blocks * block_size, kv, hd)
    caches = []
    for _ in range(config.num_layers):
        # NOTE: torch.empty, not zeros: untouched blocks cost no physical memory on CPU.
        # Reads are always limited to written slots, except the fallback's padded reads,
        # which point at block 0: zero it (garbage may be NaN, and 0 * NaN = NaN).
        k = torch.empty(k_shape, dtype=dtype, device=device)
        v = torch.empty(v_shape, dtype=dtype, device=device)
        if commit:
            k.zero_()
            v.zero_()
        elif blocked:
            k[0].zero_()
            v[0].zero_()
        else:
            k[:block_size].zero_()
            v[:block_size].zero_()
        caches.append((k, v))
    return caches
