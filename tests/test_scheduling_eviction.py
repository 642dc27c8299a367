"""Which cached prefix the pool takes back when it needs room: the least recently used, where a
prefix hit counts as a use. Model-free: the pool and the cache driven directly."""

import pytest
import torch

from lightllm_nb.kv.kv_pool import KVPool
from lightllm_nb.kv.prefix_cache import PrefixCache
from model_free import HANG_SECONDS

pytestmark = pytest.mark.timeout(HANG_SECONDS)


def pool_and_cache():
    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=16, page_size=2, max_requests=1,
                  max_context=16, dtype=torch.float32, device=torch.device("cpu"))
    return pool, PrefixCache(pool)


def test_a_prefix_hit_makes_it_the_last_to_be_evicted():
    pool, cache = pool_and_cache()
    older, newer = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]
    assert cache.insert(older, pool.alloc_pages(3, owner=0)) == []
    assert cache.insert(newer, pool.alloc_pages(3, owner=0)) == []
    assert cache.match(older).length == 6  # a hit: now the older prefix is the most recently used
    assert cache.evict(3) == 3
    assert (cache.match(older).length, cache.match(newer).length) == (6, 0), "the hit prefix was evicted"
    assert cache.evict(3) == 3, "a prefix that was hit is still evictable, last"


def test_a_prefix_in_use_counts_as_used_when_its_request_stops_not_when_it_matched():
    # "older" is matched and held by a request, "newer" is cached after that, then the request
    # stops: it used "older" until now, so "newer" is the least recently used and goes first.
    pool, cache = pool_and_cache()
    older, newer = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]
    assert cache.insert(older, pool.alloc_pages(3, owner=0)) == []
    row = pool.alloc_row()
    match = cache.match(older)
    cache.hold(row, match)
    assert cache.insert(newer, pool.alloc_pages(3, owner=0)) == []
    cache.release(row, older + [99], list(match.pages), num_computed=6, user="default")
    assert cache.evict(3) == 3
    assert (cache.match(older).length, cache.match(newer).length) == (6, 0), "the prefix just used was evicted"


def test_eviction_frees_exactly_the_pages_asked_cutting_the_last_leaf_from_its_tail():
    # 3 pages asked: all 2 of the older leaf, then 1 of the newer one's 3 (its last)
    pool, cache = pool_and_cache()
    older, newer = [1, 2, 3, 4], [7, 8, 9, 10, 11, 12]
    cache.insert(older, pool.alloc_pages(2, owner=0))
    cache.insert(newer, pool.alloc_pages(3, owner=0))
    assert cache.evict(3) == 3
    assert (cache.cached_tokens, pool.free_tokens) == (4, 12)
    assert (cache.match(older).length, cache.match(newer).length) == (0, 4)


def test_eviction_order_survives_the_compaction_of_stale_lru_entries():
    # Every hit leaves the node's earlier LRU entry stale; past 64 + 4 per node they are dropped
    # and the heap rebuilt. 100 hits on "older" get there; the least recently used still goes first.
    pool, cache = pool_and_cache()
    older, newer = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]
    cache.insert(older, pool.alloc_pages(3, owner=0))
    cache.insert(newer, pool.alloc_pages(3, owner=0))
    for _ in range(100):
        assert cache.match(older).length == 6
    assert cache.evict(3) == 3
    assert (cache.match(older).length, cache.match(newer).length) == (6, 0)
    assert cache.evict(3) == 3 and pool.free_tokens == 16


def test_the_lru_heap_is_rebuilt_after_stale_entries_are_dropped():
    # a, b, c, d cached in that order; evicting a (the oldest) leaves the heap's list as [b, d, c]
    # (valid as a heap, not sorted). 100 hits on b then make its old entries stale and trigger the
    # compaction: what is left, [d, c, b], is a heap again only once rebuilt. c goes next, not d.
    pool, cache = pool_and_cache()
    a, b, c, d = [1, 2], [3, 4], [5, 6], [7, 8]
    for tokens in (a, b, c, d):
        cache.insert(tokens, pool.alloc_pages(1, owner=0))
    assert cache.evict(1) == 1 and cache.match(a).length == 0
    for _ in range(100):
        cache.match(b)
    assert cache.evict(1) == 1
    assert [cache.match(tokens).length for tokens in (b, c, d)] == [2, 0, 2], "the least recently used is c"


def test_stale_lru_entries_stay_bounded_while_prefixes_come_and_go():
    # Every hit pushes an entry and leaves the last one stale: a long-lived notebook hits its system
    # prompt thousands of times, and the compaction is what keeps that list from growing with it.
    # Its bound follows the node count, so 300 prefixes that come and go first (each split by a
    # partial hit, then evicted) must leave that count where it was.
    pool, cache = pool_and_cache()
    for k in range(300):
        tokens = [1000 + 4 * k + i for i in range(4)]
        cache.insert(tokens, pool.alloc_pages(2, owner=0))
        assert cache.match(tokens[:2] + [0, 0]).length == 2  # splits the node after its first page
        assert cache.evict(2) == 2
    cache.insert([1, 2, 3, 4], pool.alloc_pages(2, owner=0))
    for _ in range(1000):
        cache.match([1, 2, 3, 4])
    assert len(cache._lru) < 100
