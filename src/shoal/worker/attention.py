"""Attention over a paged KV cache, for a flat batch of decode and prefill tokens.

A step's tokens arrive as one flat list: first the decode queries (one token per
request), then the prefill chunks (several consecutive tokens of one request each).
Every token's K/V is first written to its slot in the cache; only then does any
attention read, so requests scheduled together may share freshly cached blocks.

The cache of one layer is two tensors [num_slots, kv_heads, head_dim] where
slot = block_id * block_size + offset; block 0 is the padding target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    """One request's run of consecutive query tokens inside the flat batch."""

    token_start: int           # index of the chunk's first token in the flat batch
    num_tokens: int
    context_len: int           # tokens visible to the chunk's last query (cached + chunk)
    context_slots: torch.Tensor | None  # [context_len] slots to read; None if the chunk is the whole context


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token's K/V goes and which cached K/V each query reads."""

    slot_mapping: torch.Tensor                 # [T] write slot of every token
    block_size: int = 16
    num_decodes: int = 0
    decode_block_table: torch.Tensor | None = None   # [D, B] block ids (padded with 0)
    decode_context_lens: torch.Tensor | None = None  # [D] keys visible to each decode query
    # Filled for the PyTorch fallback only (gather + SDPA), once per step:
    decode_slots: torch.Tensor | None = None   # [D, Lmax] read slots (padded with 0)
    decode_mask: torch.Tensor | None = None    # [D, 1, 1, Lmax] True where a key is real
    prefills: list[PrefillChunk] = field(default_factory=list)
    kernels: Any = None                        # compiled CPU kernels, or None


def prepare_decode_gather(meta: AttentionMetadata) -> None:
    """Slot indices and padding mask for the gather-based decode path."""
    table, lengths = meta.decode_block_table, meta.decode_context_lens
    assert table is not None and lengths is not None
    bs = meta.block_size
    max_len = int(lengths.max())
    offsets = torch.arange(max_len, device=table.device)
    valid = offsets[None, :] < lengths[:, None]
    # NOTE: padding reads slot 0 (block 0 is zeroed and never written): an unwritten slot
    # may hold NaN, and a masked NaN still poisons SDPA's weighted sum.
    meta.decode_slots = torch.where(valid, table[:, offsets // bs] * bs + offsets % bs, 0)
    meta.decode_mask = valid.view(len(lengths), 1, 1, max_len)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, hd]; k, v: [T, KV, hd]. Returns [T, H * hd]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)

    d = meta.num_decodes
    if d and meta.kernels is not None:
        out[:d] = meta.kernels.paged_attention_decode(
            q[:d], k_cache, v_cache, meta.decode_block_table, meta.decode_context_lens,
            meta.block_size, scale)
    elif d:
        # NOTE: a decode query is one token, so the `group` query heads that share a
        # KV head can stand in the query-length axis: no causal mask, no K/V repeat.
        keys = k_cache[meta.decode_slots].transpose(1, 2)      # [D, KV, L, hd]
        values = v_cache[meta.decode_slots].transpose(1, 2)
        queries = q[:d].view(d, num_kv_heads, group, head_dim)
        attn = F.scaled_dot_product_attention(queries, keys, values,
                                              attn_mask=meta.decode_mask, scale=scale)
        out[:d] = attn.reshape(d, num_heads, head_dim)

    for chunk in meta.prefills:
        s, n = chunk.token_start, chunk.num_tokens
        queries = q[s:s + n].transpose(0, 1).unsqueeze(0)      # [1, H, n, hd]
        if chunk.context_slots is None:
            keys = k[s:s + n].transpose(0, 1).unsqueeze(0)     # [1, KV, n, hd]
            values = v[s:s + n].transpose(0, 1).unsqueeze(0)
            attn = F.scaled_dot_product_attention(queries, keys, values, is_causal=True,
                                                  scale=scale, enable_gqa=group > 1)
        else:
            keys = k_cache[chunk.context_slots].transpose(0, 1).unsqueeze(0)
            values = v_cache[chunk.context_slots].transpose(0, 1).unsqueeze(0)
            past = chunk.context_len - n
            # Query i sits at position past + i and sees keys 0 .. past + i.
            mask = torch.ones(n, chunk.context_len, dtype=torch.bool, device=q.device).tril(past)
            attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask,
                                                  scale=scale, enable_gqa=group > 1)
        out[s:s + n] = attn.squeeze(0).transpose(0, 1)
    return out.view(num_tokens, num_heads * head_dim)
