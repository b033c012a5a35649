"""Attention over a paged KV cache, for a flat batch of decode and prefill tokens.

A step's tokens arrive as one flat list: the decode queries (one token per request)
first, then the prefill chunks (several consecutive tokens of one request each).
Every token's K/V is first written to its slot in the cache; only then does any
attention read, so requests scheduled together may share freshly cached blocks.

Two implementations with the same semantics:
- the C++ kernel (CPU, float32): every query, decode or prefill, reads its keys
  straight from the blocks with one fixed arithmetic order, which makes a request's
  output independent of chunking, prefix-cache hits and batch company;
- the PyTorch fallback (CUDA, other dtypes, no compiler): decodes gather their keys
  and run one batched SDPA; prefill chunks run SDPA one chunk at a time.

A token's slot is block_id * block_size + offset; block 0 is zeroed and never written.
The kernel uses a blocked cache layout, the fallback a flat one (engine/kv/tensors.py).

Sliding-window layers (Gemma 3's local layers) pass `window` > 0: a query at position p
then attends to keys p - window + 1 .. p only. The cache still holds every token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    """One request's run of consecutive query tokens inside the flat batch (fallback path)."""

    token_start: int           # index of the chunk's first token in the flat batch
    num_tokens: int
    context_len: int           # tokens visible to the chunk's last query (cached + chunk)
    context_slots: torch.Tensor | None  # [context_len] slots to read; None if the chunk is the whole context


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token's K/V goes and which cached K/V each query reads."""

    slot_mapping: torch.Tensor                 # [T] write slot of every token
    block_size: int = 16
    # Kernel path: one row per sequence of the step, in flat-batch order.
    kernels: Any = None                        # compiled CPU kernels, or None
    block_tables: torch.Tensor | None = None   # [N, B] block ids (padded with 0)
    query_start: torch.Tensor | None = None    # [N + 1] flat index of each sequence's first query
    first_pos: torch.Tensor | None = None      # [N] position of each sequence's first query
    # Fallback path:
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None   # [D, Lmax] read slots (padding reads slot 0)
    decode_mask: torch.Tensor | None = None    # [D, 1, 1, Lmax] True where a key is real
    decode_lengths: torch.Tensor | None = None  # [D] keys each decode query sees (no window)
    prefills: list[PrefillChunk] = field(default_factory=list)
    # fallback masks of sliding-window layers, built once per step: (what, window) -> mask
    window_masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


def prepare_decode_gather(meta: AttentionMetadata, block_table: torch.Tensor,
                          lengths: torch.Tensor) -> None:
    """Slot indices and padding mask for the fallback's batched decode."""
    bs = meta.block_size
    max_len = int(lengths.max())
    offsets = torch.arange(max_len, device=block_table.device)
    valid = offsets[None, :] < lengths[:, None]
    # NOTE: padding reads slot 0 (block 0 is zeroed and never written): an unwritten slot
    # may hold NaN, and a masked NaN still poisons SDPA's weighted sum.
    meta.decode_slots = torch.where(valid, block_table[:, offsets // bs] * bs + offsets % bs, 0)
    meta.decode_mask = valid.view(len(lengths), 1, 1, max_len)
    meta.decode_lengths = lengths
    meta.num_decodes = len(lengths)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, window: int = 0) -> torch.Tensor:
    """q: [T, H, hd]; k, v: [T, KV, hd]. Returns [T, H * hd].

    window > 0: each query sees only its last `window` keys (itself included).
    """
    num_tokens, num_heads, head_dim = q.shape
    if meta.kernels is not None:
        meta.kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if window:
            out = meta.kernels.paged_attention(q, k_cache, v_cache, meta.block_tables,
                                               meta.query_start, meta.first_pos, scale, window)
        else:
            out = meta.kernels.paged_attention(q, k_cache, v_cache, meta.block_tables,
                                               meta.query_start, meta.first_pos, scale)
        return out.view(num_tokens, num_heads * head_dim)
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    return _fallback_attention(q, k, v, k_cache, v_cache, meta, scale, window)


def _decode_mask(meta: AttentionMetadata, window: int) -> torch.Tensor:
    """The decode queries' key mask, narrowed to each one's last `window` keys."""
    if not window or int(meta.decode_lengths.max()) <= window:
        return meta.decode_mask
    key = (-1, window)
    mask = meta.window_masks.get(key)
    if mask is None:
        lengths = meta.decode_lengths
        offsets = torch.arange(meta.decode_mask.shape[-1], device=lengths.device)
        recent = offsets[None, :] >= (lengths - window)[:, None]
        mask = meta.decode_mask & recent.view_as(meta.decode_mask)
        meta.window_masks[key] = mask
    return mask


def _chunk_mask(meta: AttentionMetadata, index: int, chunk: PrefillChunk, window: int,
                device: torch.device) -> torch.Tensor | None:
    """[n, context_len] mask of a prefill chunk; None = plain causal over the chunk alone."""
    n, past = chunk.num_tokens, chunk.context_len - chunk.num_tokens
    if chunk.context_slots is None and (not window or n <= window):
        return None
    key = (index, window if window and chunk.context_len > window else 0)
    mask = meta.window_masks.get(key)
    if mask is None:
        # Query i sits at position past + i and sees keys 0 .. past + i (or only the last
        # `window` of them).
        mask = torch.ones(n, chunk.context_len, dtype=torch.bool, device=device).tril(past)
        if key[1]:
            mask = mask.triu(past - window + 1)
        meta.window_masks[key] = mask
    return mask


def _fallback_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float, window: int = 0) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    d = meta.num_decodes
    if d:
        # NOTE: a decode query is one token, so the `group` query heads that share a
        # KV head can stand in the query-length axis: no causal mask, no K/V repeat.
        keys = k_cache[meta.decode_slots].transpose(1, 2)      # [D, KV, L, hd]
        values = v_cache[meta.decode_slots].transpose(1, 2)
        queries = q[:d].view(d, num_kv_heads, group, head_dim)
        attn = F.scaled_dot_product_attention(queries, keys, values,
                                              attn_mask=_decode_mask(meta, window), scale=scale)
        out[:d] = attn.reshape(d, num_heads, head_dim)
    for index, chunk in enumerate(meta.prefills):
        s, n = chunk.token_start, chunk.num_tokens
        queries = q[s:s + n].transpose(0, 1).unsqueeze(0)      # [1, H, n, hd]
        if chunk.context_slots is None:
            keys = k[s:s + n].transpose(0, 1).unsqueeze(0)     # [1, KV, n, hd]
            values = v[s:s + n].transpose(0, 1).unsqueeze(0)
        else:
            keys = k_cache[chunk.context_slots].transpose(0, 1).unsqueeze(0)
            values = v_cache[chunk.context_slots].transpose(0, 1).unsqueeze(0)
        mask = _chunk_mask(meta, index, chunk, window, q.device)
        if mask is None:
            attn = F.scaled_dot_product_attention(queries, keys, values, is_causal=True,
                                                  scale=scale, enable_gqa=group > 1)
        else:
            attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask,
                                                  scale=scale, enable_gqa=group > 1)
        out[s:s + n] = attn.squeeze(0).transpose(0, 1)
    return out.view(num_tokens, num_heads * head_dim)
