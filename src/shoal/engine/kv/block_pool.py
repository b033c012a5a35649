"""BlockPool: the fixed set of KV blocks, their reference counts and the prefix cache."""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Iterable, Sequence

from shoal.core.errors import InvalidParameterError, ShoalError

NULL_BLOCK_ID = 0


class KVCacheError(ShoalError):
    """The block pool was misused or its bookkeeping disagrees with itself (a bug)."""


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One block of KV slots: how many sequences use it and, once cached, its content key."""

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


class BlockPool:
    """Hands out blocks, takes them back, and keeps freed full blocks findable by hash.

    A block is either in use (ref_cnt > 0) or in the free queue. Free blocks that still
    hold a cached hash stay findable until they are taken for new data; the free queue
    is in eviction order, least recently freed first.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 2:
            raise InvalidParameterError(
                "num_blocks", f"must be an integer >= 2 (block 0 is reserved), got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(block_id) for block_id in range(num_blocks)]
        # NOTE: block 0 is never handed out: the model runner points padding slots at it.
        self.null_block = self.blocks[NULL_BLOCK_ID]
        # NOTE: an OrderedDict is a doubly linked list underneath: O(1) removal of a cached
        # block from the middle of the queue when a prefix hit revives it.
        self._free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (block.block_id, block) for block in self.blocks[1:])
        self._cached: dict[int, KVCacheBlock] = {}
        # (stored?, block_hash) per change of the prefix cache, for a router outside the engine
        # (a replica set's KV-aware routing); None: nobody listens, nothing is recorded.
        # NOTE: a deque: the engine thread appends while another thread pops, without a lock.
        self.events: deque[tuple[bool, int]] | None = None

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, counting evictable cached ones."""
        return len(self._free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Takes `num_blocks` blocks from the eviction end of the free queue (ref_cnt 1)."""
        if num_blocks > len(self._free_queue):
            raise KVCacheError(
                f"asked for {num_blocks} blocks but only {len(self._free_queue)} are free")
        taken = []
        for _ in range(num_blocks):
            _, block = self._free_queue.popitem(last=False)
            self.uncache_block(block)
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Adds a user to each block, reviving free-but-cached ones out of the free queue."""
        for block in blocks:
            self._check_not_null(block)
            if block.ref_cnt == 0:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drops a user from each block; unused ones join the free queue in the given order."""
        for block in blocks:
            self._check_not_null(block)
            if block.ref_cnt <= 0:
                raise KVCacheError(f"block {block.block_id} freed more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block.block_id] = block

    def cache_full_block(self, block: KVCacheBlock, block_hash: int,
                         token_ids: Sequence[int]) -> bool:
        """Makes a full block findable by its hash; False if it is not (caching off or taken)."""
        if not self.enable_caching:
            return False
        if block.block_hash is not None:
            return block.block_hash == block_hash   # already cached (a prefix hit)
        self._check_not_null(block)
        if block_hash in self._cached:
            # NOTE: two sequences computed the same content into different blocks; the
            # first stays the cached copy and this one is freed as a plain block.
            return False
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block
        if self.events is not None:
            self.events.append((True, block_hash))
        return True

    def get_cached_block(self, block_hash: int, token_ids: Sequence[int]) -> KVCacheBlock | None:
        """The cached block with this hash, only if it really holds these token ids."""
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def uncache_block(self, block: KVCacheBlock) -> None:
        """Forgets the block's hash so no future lookup can find it."""
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
                if self.events is not None:
                    self.events.append((False, block.block_hash))
            block.block_hash = None
            block.token_ids = None

    def reset_prefix_cache(self) -> int:
        """Forgets every cached hash (blocks in use keep their data); returns how many."""
        count = len(self._cached)
        for block in list(self._cached.values()):
            self.uncache_block(block)
        return count

    def check_integrity(self) -> None:
        """Raises KVCacheError if ref counts, the free queue and the hash map disagree."""
        null = self.null_block
        if null.ref_cnt or null.block_hash is not None or NULL_BLOCK_ID in self._free_queue:
            raise KVCacheError("the null block was handed out or cached")
        for block in self.blocks[1:]:
            queued = block.block_id in self._free_queue
            if block.ref_cnt < 0 or (block.ref_cnt == 0) != queued:
                raise KVCacheError(
                    f"block {block.block_id}: ref_cnt {block.ref_cnt} but in free queue: {queued}")
            if block.block_hash is not None and self._cached.get(block.block_hash) is not block:
                raise KVCacheError(f"block {block.block_id} has a hash the cache does not map to it")
        for block_id, block in self._free_queue.items():
            if self.blocks[block_id] is not block:
                raise KVCacheError(f"free queue entry {block_id} is not that block")
        for block_hash, block in self._cached.items():
            if block.block_hash != block_hash or block.token_ids is None:
                raise KVCacheError(f"cache entry for block {block.block_id} has a stale hash")

    def _check_not_null(self, block: KVCacheBlock) -> None:
        if block.block_id == NULL_BLOCK_ID:
            raise KVCacheError("the null block cannot be used or freed")
