"""BlockPool and block hashing: allocation, ref counts, LRU eviction, cache lookups."""
from __future__ import annotations

import pytest

from shoal.core.errors import InvalidParameterError
from shoal.core.sampling_params import SamplingParams
from shoal.engine.kv import BlockPool, KVCacheError, hash_block, update_block_hashes
from shoal.engine.request import Request


def _take_all(pool: BlockPool):
    return pool.get_new_blocks(pool.num_free_blocks)


# -- hashing -------------------------------------------------------------------------------

def test_hash_is_chained_and_salted():
    tokens = (1, 2, 3, 4)
    root = hash_block(None, tokens, salt=0)
    assert hash_block(None, tokens, salt=0) == root                  # deterministic
    assert hash_block(None, list(tokens), salt=0) == root            # any sequence type
    assert hash_block(None, tokens, salt=1) != root                  # model identity matters
    assert hash_block(root, tokens, salt=0) != root                  # position in chain matters
    assert hash_block(None, (1, 2, 3, 5), salt=0) != root
    # The same block behind two different parents must not share a key.
    other_root = hash_block(None, (9, 9, 9, 9), salt=0)
    assert hash_block(root, (5, 6, 7, 8), 0) != hash_block(other_root, (5, 6, 7, 8), 0)
    assert hash_block(0, tokens, salt=0) != root                     # parent 0 is not "no parent"


def test_update_block_hashes_is_incremental_and_covers_full_blocks_only():
    request = Request("r", list(range(10)), SamplingParams(), cache_salt=7)
    update_block_hashes(request, block_size=4)
    assert len(request.block_hashes) == 2                           # 10 tokens: 2 full blocks
    first = list(request.block_hashes)
    assert first[0] == hash_block(None, (0, 1, 2, 3), 7)
    assert first[1] == hash_block(first[0], (4, 5, 6, 7), 7)
    request.append_output_token(100)
    update_block_hashes(request, block_size=4)
    assert request.block_hashes == first                            # 11 tokens: still 2
    request.append_output_token(101)
    update_block_hashes(request, block_size=4)
    assert request.block_hashes[:2] == first
    assert request.block_hashes[2] == hash_block(first[1], (8, 9, 100, 101), 7)


# -- pool ----------------------------------------------------------------------------------

def test_null_block_is_never_handed_out():
    pool = BlockPool(6)
    assert pool.num_free_blocks == 5
    blocks = _take_all(pool)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4, 5]
    assert all(b.ref_cnt == 1 for b in blocks)
    with pytest.raises(KVCacheError):
        pool.get_new_blocks(1)
    with pytest.raises(KVCacheError):
        pool.touch([pool.null_block])
    pool.check_integrity()


def test_invalid_pool_size():
    with pytest.raises(InvalidParameterError):
        BlockPool(1)


def test_double_free_is_detected():
    pool = BlockPool(4)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(KVCacheError):
        pool.free_blocks([block])


def test_eviction_takes_the_least_recently_freed_block_and_forgets_its_hash():
    pool = BlockPool(5)
    b1, b2, b3, b4 = _take_all(pool)
    for i, block in enumerate((b1, b2, b3)):
        assert pool.cache_full_block(block, 100 + i, (i,))
    pool.free_blocks([b3, b2])       # a request's tail first
    pool.free_blocks([b1])
    assert pool.num_free_blocks == 3
    # Free-but-cached blocks stay findable until reused.
    assert pool.get_cached_block(100, (0,)) is b1
    (taken,) = pool.get_new_blocks(1)
    assert taken is b3
    assert taken.block_hash is None and pool.get_cached_block(102, (2,)) is None
    assert pool.get_cached_block(101, (1,)) is b2
    assert [b.block_id for b in pool.get_new_blocks(2)] == [b2.block_id, b1.block_id]
    assert pool.num_cached_blocks == 0
    pool.check_integrity()


def test_touch_revives_a_cached_free_block_out_of_the_free_queue():
    pool = BlockPool(4)
    b1, b2, b3 = _take_all(pool)
    pool.cache_full_block(b1, 11, (1, 1))
    pool.free_blocks([b1, b2])
    assert pool.num_free_blocks == 2
    hit = pool.get_cached_block(11, (1, 1))
    pool.touch([hit])
    assert hit.ref_cnt == 1 and pool.num_free_blocks == 1
    # The revived block can no longer be evicted: only b2 remains to hand out.
    assert pool.get_new_blocks(1) == [b2]
    assert pool.get_cached_block(11, (1, 1)) is b1
    pool.touch([b1])                 # a second sharer
    pool.free_blocks([b1])
    assert b1.ref_cnt == 1 and pool.num_free_blocks == 0
    pool.check_integrity()


def test_hash_collision_never_returns_a_block_with_other_tokens():
    pool = BlockPool(3)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_block(block, 42, (1, 2, 3))
    assert pool.get_cached_block(42, (1, 2, 3)) is block
    assert pool.get_cached_block(42, (1, 2, 4)) is None
    assert pool.get_cached_block(43, (1, 2, 3)) is None


def test_duplicate_content_keeps_the_first_cached_copy():
    pool = BlockPool(4)
    first, second, _ = _take_all(pool)
    assert pool.cache_full_block(first, 5, (7,))
    assert not pool.cache_full_block(second, 5, (7,))
    assert second.block_hash is None
    pool.free_blocks([second, first])
    assert pool.get_cached_block(5, (7,)) is first
    pool.check_integrity()


def test_reset_prefix_cache_forgets_everything_but_keeps_blocks_in_use():
    pool = BlockPool(4)
    a, b, _ = _take_all(pool)
    pool.cache_full_block(a, 1, (1,))
    pool.cache_full_block(b, 2, (2,))
    pool.free_blocks([a])
    assert pool.reset_prefix_cache() == 2
    assert pool.get_cached_block(1, (1,)) is None and pool.get_cached_block(2, (2,)) is None
    assert b.ref_cnt == 1
    pool.check_integrity()


def test_caching_disabled():
    pool = BlockPool(3, enable_caching=False)
    (block,) = pool.get_new_blocks(1)
    assert not pool.cache_full_block(block, 1, (1,))
    assert pool.get_cached_block(1, (1,)) is None


@pytest.mark.parametrize("corrupt", ["ref_cnt", "hash", "queue"])
def test_check_integrity_detects_corruption(corrupt):
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    pool.cache_full_block(a, 9, (9,))
    pool.check_integrity()
    if corrupt == "ref_cnt":
        b.ref_cnt = 0                  # unused, yet not in the free queue
    elif corrupt == "hash":
        b.block_hash = 9               # claims a hash the map gives to another block
    else:
        pool.free_blocks([b])
        b.ref_cnt = 2                  # in use, yet queued for reuse
    with pytest.raises(KVCacheError):
        pool.check_integrity()


# -- prefix-cache events (a replica router's feed) ------------------------------------------

def test_store_and_evict_events_in_order_only_when_listened_to():
    from collections import deque

    pool = BlockPool(3)
    (block,) = pool.get_new_blocks(1)
    assert pool.cache_full_block(block, 11, (1, 2)) and pool.events is None   # nobody listens: nothing kept
    pool.events = deque()
    (other,) = pool.get_new_blocks(1)
    pool.cache_full_block(other, 22, (3, 4))
    pool.cache_full_block(other, 22, (3, 4))          # already cached: no second event
    pool.free_blocks([block, other])
    pool.get_new_blocks(2)                             # reuses both: their hashes are evicted
    assert list(pool.events) == [(True, 22), (False, 11), (False, 22)]
