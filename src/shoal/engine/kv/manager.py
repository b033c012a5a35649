"""KVCacheManager: each request's block table on top of the shared BlockPool."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from shoal.core.errors import InvalidParameterError
from shoal.engine.kv.block_pool import BlockPool, KVCacheBlock, KVCacheError
from shoal.engine.kv.hashing import update_block_hashes

if TYPE_CHECKING:
    from shoal.engine.request import Request


class KVCacheManager:
    """Allocates, shares (prefix cache) and frees the KV blocks of requests."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise InvalidParameterError("block_size", f"must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._tables: dict[str, list[KVCacheBlock]] = {}
        self._num_cached: dict[str, int] = {}   # leading blocks of a table already registered
        self.prefix_cache_queries = 0           # tokens looked up
        self.prefix_cache_hits = 0              # tokens found

    # -- lookups ---------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Blocks that can hold KV (the reserved null block excluded)."""
        return self.pool.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self._tables.get(request_id, ())]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ----------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of cached full blocks that starts the request, and its token count.

        Never covers the last token: the model must compute at least one position to
        produce the logits of the next token.
        """
        if not self.enable_prefix_caching or request.skip_prefix_cache:
            return [], 0
        update_block_hashes(request, self.block_size)
        size = self.block_size
        max_blocks = (request.num_tokens - 1) // size
        tokens = request.all_token_ids
        hits: list[KVCacheBlock] = []
        for index, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block = self.pool.get_cached_block(block_hash, tokens[index * size:(index + 1) * size])
            if block is None:
                break
            hits.append(block)
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += len(hits) * size
        return hits, len(hits) * size

    # -- allocation ------------------------------------------------------------------------

    def can_allocate(self, request: Request, num_new_tokens: int,
                     new_computed_blocks: Sequence[KVCacheBlock] = ()) -> bool:
        num_new = self._num_new_blocks(request, num_new_tokens, new_computed_blocks)
        # NOTE: a hit block sitting in the free queue is counted there as free, but
        # touching it takes it out: it cannot also be handed out as a new block.
        reviving = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        return num_new <= self.pool.num_free_blocks - reviving

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVCacheBlock] = (),
                       num_new_computed_tokens: int = 0) -> bool:
        """Grows the request's block table to hold this step's tokens; False changes nothing.

        Blocks that will be full once this step's tokens are computed are registered in
        the prefix cache right away: the runner writes a whole step's KV before any
        attention reads it, so a request admitted later in the same step may share them.
        """
        if num_new_computed_tokens != len(new_computed_blocks) * self.block_size:
            raise KVCacheError("num_new_computed_tokens must cover exactly the hit blocks")
        if new_computed_blocks and request.request_id in self._tables:
            raise KVCacheError(f"request {request.request_id!r} already has blocks; hits are for new tables")
        if not self.can_allocate(request, num_new_tokens, new_computed_blocks):
            return False
        num_new = self._num_new_blocks(request, num_new_tokens, new_computed_blocks)
        table = self._tables.setdefault(request.request_id, [])
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            table.extend(new_computed_blocks)
            self._num_cached[request.request_id] = len(new_computed_blocks)
        if num_new > 0:
            table.extend(self.pool.get_new_blocks(num_new))
        total = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        self._cache_full_blocks(request, min(total, request.num_tokens) // self.block_size)
        return True

    def free(self, request: Request) -> None:
        """Releases the request's blocks, tail first so a shared prefix is evicted last."""
        table = self._tables.pop(request.request_id, None)
        self._num_cached.pop(request.request_id, None)
        if table is None:
            return
        # NOTE: blocks past the computed tokens were registered at allocation but their
        # KV may never be written (a request preempted or aborted in the step that
        # allocated them); forget their hashes so nobody can hit unwritten KV.
        first_unwritten = request.num_computed_tokens // self.block_size
        for block in table[first_unwritten:]:
            if block.ref_cnt == 1:
                self.pool.uncache_block(block)
        self.pool.free_blocks(reversed(table))

    def reset_prefix_cache(self) -> int:
        """Forgets every cached block hash; returns how many were dropped."""
        return self.pool.reset_prefix_cache()

    def check_integrity(self) -> None:
        """Raises KVCacheError unless every ref count equals the tables that hold the block."""
        self.pool.check_integrity()
        holders = [0] * self.pool.num_blocks
        for table in self._tables.values():
            for block in table:
                holders[block.block_id] += 1
        for block in self.pool.blocks:
            if holders[block.block_id] != block.ref_cnt:
                raise KVCacheError(
                    f"block {block.block_id}: ref_cnt {block.ref_cnt} but held by {holders[block.block_id]} tables")

    # -- internals -------------------------------------------------------------------------

    def _num_new_blocks(self, request: Request, num_new_tokens: int,
                        new_computed_blocks: Sequence[KVCacheBlock]) -> int:
        total = request.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        held = len(self._tables.get(request.request_id, ())) + len(new_computed_blocks)
        return max(0, self.blocks_needed(total) - held)

    def _cache_full_blocks(self, request: Request, num_full_blocks: int) -> None:
        if not self.enable_prefix_caching:
            return
        start = self._num_cached.get(request.request_id, 0)
        if num_full_blocks <= start:
            return
        update_block_hashes(request, self.block_size)
        table = self._tables[request.request_id]
        size = self.block_size
        tokens = request.all_token_ids
        for index in range(start, num_full_blocks):
            self.pool.cache_full_block(table[index], request.block_hashes[index],
                                       tokens[index * size:(index + 1) * size])
        self._num_cached[request.request_id] = num_full_blocks
