"""KVCacheManager: block tables, prefix-cache hits, exact accounting."""
from __future__ import annotations

import pytest

from fake_runner import make_request
from shoal.engine.kv import KVCacheError, KVCacheManager

BS = 16


def _compute(manager: KVCacheManager, request, num_tokens: int | None = None) -> None:
    """Allocates and marks `num_tokens` (default: all) tokens as computed, as a step would."""
    num_tokens = request.num_tokens if num_tokens is None else num_tokens
    hits, num_hit = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, num_tokens - num_hit, hits, num_hit)
    request.num_computed_tokens = num_tokens


def test_block_table_grows_with_tokens_and_ids_are_unique():
    manager = KVCacheManager(num_blocks=20, block_size=BS)
    a = make_request("a", range(40))
    b = make_request("b", range(100, 117))
    assert manager.allocate_slots(a, 40)
    assert manager.allocate_slots(b, 17)
    assert len(manager.get_block_ids("a")) == 3 and len(manager.get_block_ids("b")) == 2
    ids = manager.get_block_ids("a") + manager.get_block_ids("b")
    assert len(set(ids)) == 5 and 0 not in ids
    a.num_computed_tokens = 40
    a.append_output_token(5)
    assert manager.allocate_slots(a, 1)                       # token 41 still fits block 3
    assert len(manager.get_block_ids("a")) == 3
    for t in range(8):
        a.append_output_token(t)
    a.num_computed_tokens = 48
    assert manager.allocate_slots(a, 1)                       # token 49 needs block 4
    assert len(manager.get_block_ids("a")) == 4
    assert manager.num_used_blocks == 6
    assert manager.usage == pytest.approx(6 / 19)
    manager.check_integrity()


def test_failed_allocation_changes_nothing():
    manager = KVCacheManager(num_blocks=5, block_size=BS)    # 4 usable blocks
    a = make_request("a", range(48))
    assert manager.allocate_slots(a, 48)
    b = make_request("b", range(500, 540))
    before = manager.num_free_blocks
    assert not manager.allocate_slots(b, 40)                  # needs 3, 1 free
    assert manager.num_free_blocks == before and manager.get_block_ids("b") == []
    assert manager.allocate_slots(b, 16)                      # a one-block chunk fits
    manager.free(a)
    manager.free(b)
    assert manager.num_used_blocks == 0
    manager.check_integrity()


def test_shared_prefix_hits_full_blocks_only():
    manager = KVCacheManager(num_blocks=20, block_size=BS)
    system = list(range(1000, 1040))                          # 40 tokens: 2 full blocks
    a = make_request("a", system + [1, 2, 3])
    _compute(manager, a)
    b = make_request("b", system + [7, 8, 9, 10])
    hits, num_hit = manager.get_computed_blocks(b)
    assert num_hit == 32
    assert [h.block_id for h in hits] == manager.get_block_ids("a")[:2]
    assert manager.allocate_slots(b, b.num_tokens - num_hit, hits, num_hit)
    assert manager.get_block_ids("b")[:2] == manager.get_block_ids("a")[:2]
    assert manager.get_block_ids("b")[2] != manager.get_block_ids("a")[2]
    assert manager.num_used_blocks == 4                       # 3 for a + 1 new for b
    assert manager.prefix_cache_hits == 32
    assert manager.prefix_cache_queries == a.num_tokens + b.num_tokens
    manager.check_integrity()
    manager.free(a)
    manager.free(b)
    assert manager.num_used_blocks == 0
    manager.check_integrity()


def test_hit_never_covers_the_last_token():
    manager = KVCacheManager(num_blocks=20, block_size=BS)
    a = make_request("a", range(32))                          # exactly 2 full blocks
    _compute(manager, a)
    manager.free(a)
    again = make_request("again", range(32))
    hits, num_hit = manager.get_computed_blocks(again)
    assert num_hit == 16 and len(hits) == 1                   # the 2nd block must be recomputed
    longer = make_request("longer", list(range(32)) + [5])
    assert manager.get_computed_blocks(longer)[1] == 32


def test_salt_separates_caches():
    manager = KVCacheManager(num_blocks=20, block_size=BS)
    a = make_request("a", range(40), cache_salt=1)
    _compute(manager, a)
    other_model = make_request("b", range(40), cache_salt=2)
    assert manager.get_computed_blocks(other_model) == ([], 0)
    same_model = make_request("c", range(40), cache_salt=1)
    assert manager.get_computed_blocks(same_model)[1] == 32


def test_blocks_whose_kv_was_never_computed_are_not_hit():
    # A request allocated for its whole prompt (registering the full blocks) and was
    # then preempted/aborted before the step ran: nobody may reuse that unwritten KV.
    manager = KVCacheManager(num_blocks=20, block_size=BS)
    a = make_request("a", range(48))
    hits, num_hit = manager.get_computed_blocks(a)
    assert manager.allocate_slots(a, 48, hits, num_hit)
    peer = make_request("peer", list(range(48)) + [1])
    assert manager.get_computed_blocks(peer)[1] == 48         # same-step sharing is allowed
    manager.free(a)                                           # a.num_computed_tokens is still 0
    assert manager.get_computed_blocks(peer) == ([], 0)
    manager.check_integrity()


def test_partially_computed_request_keeps_only_its_computed_blocks_cached():
    manager = KVCacheManager(num_blocks=20, block_size=BS)
    a = make_request("a", range(64))
    assert manager.allocate_slots(a, 32)                      # chunk 1
    a.num_computed_tokens = 32
    assert manager.allocate_slots(a, 32)                      # chunk 2, never run
    manager.free(a)
    probe = make_request("probe", list(range(64)) + [0])
    assert manager.get_computed_blocks(probe)[1] == 32


def test_evictable_hit_blocks_are_not_counted_twice():
    manager = KVCacheManager(num_blocks=5, block_size=BS)    # 4 usable blocks
    a = make_request("a", range(48))                          # 3 blocks
    _compute(manager, a)
    manager.free(a)
    assert manager.num_free_blocks == 4 and manager.num_used_blocks == 0
    b = make_request("b", list(range(48)) + list(range(20)))  # 68 tokens: 5 blocks
    hits, num_hit = manager.get_computed_blocks(b)
    assert num_hit == 48
    # 4 "free" blocks, but 3 of them are the hits themselves: only 1 is left for 2 new.
    assert not manager.allocate_slots(b, b.num_tokens - num_hit, hits, num_hit)
    assert manager.num_free_blocks == 4
    assert manager.get_computed_blocks(b)[1] == 48            # nothing was evicted
    manager.check_integrity()


def test_lru_evicts_cached_blocks_only_when_needed():
    manager = KVCacheManager(num_blocks=7, block_size=BS)    # 6 usable blocks
    old = make_request("old", range(48))
    _compute(manager, old)
    manager.free(old)
    # Three untouched blocks are handed out before any cached one is evicted.
    filler = make_request("filler", range(900, 948))
    assert manager.allocate_slots(filler, 48)
    assert manager.get_computed_blocks(make_request("p", list(range(48)) + [1]))[1] == 48
    # One more block must now evict: the tail of `old` goes first, its head survives.
    more = make_request("more", range(700, 716))
    assert manager.allocate_slots(more, 16)
    assert manager.get_computed_blocks(make_request("q", list(range(48)) + [1]))[1] == 32
    manager.check_integrity()


def test_prefix_caching_disabled():
    manager = KVCacheManager(num_blocks=20, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", range(40))
    _compute(manager, a)
    manager.free(a)
    assert manager.get_computed_blocks(make_request("b", range(40))) == ([], 0)
    assert manager.prefix_cache_queries == 0


def test_reset_prefix_cache():
    manager = KVCacheManager(num_blocks=20, block_size=BS)
    a = make_request("a", range(40))
    _compute(manager, a)
    manager.free(a)
    assert manager.reset_prefix_cache() == 2
    assert manager.get_computed_blocks(make_request("b", range(40)))[1] == 0
    manager.check_integrity()


def test_integrity_check_sees_a_leaked_reference():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", range(20))
    assert manager.allocate_slots(a, 20)
    manager.check_integrity()
    manager.pool.touch([manager.pool.blocks[manager.get_block_ids("a")[0]]])
    with pytest.raises(KVCacheError):
        manager.check_integrity()
