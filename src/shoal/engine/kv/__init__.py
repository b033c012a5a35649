"""Paged KV cache bookkeeping: block pool, prefix-cache hashing, per-request block tables."""
from __future__ import annotations

from shoal.engine.kv.block_pool import NULL_BLOCK_ID, BlockPool, KVCacheBlock, KVCacheError
from shoal.engine.kv.hashing import hash_block, update_block_hashes
from shoal.engine.kv.manager import KVCacheManager

__all__ = [
    "NULL_BLOCK_ID", "BlockPool", "KVCacheBlock", "KVCacheError", "KVCacheManager",
    "hash_block", "update_block_hashes",
]
