"""Which cached prefix the pool takes back when it needs room: the least recently used, where a
prefix hit counts as a use. Model-free: the pool and the cache driven directly."""

import pytest
import torch

from lightllm_nb.kv.kv_pool import KVPool
from lightllm_nb.kv.prefix_cache import PrefixCache
from model_free import HANG_SECONDS

pytestmark = pytest.mark.timeout(HANG_SECONDS)


def test_a_prefix_hit_makes_it_the_last_to_be_evicted():
    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=16, page_size=2, max_requests=1,
                  max_context=16, dtype=torch.float32, device=torch.device("cpu"))
    cache = PrefixCache(pool)
    older, newer = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]
    assert cache.insert(older, pool.alloc_pages(3, owner=0)) == []
    assert cache.insert(newer, pool.alloc_pages(3, owner=0)) == []
    assert cache.match(older).length == 6  # a hit: now the older prefix is the most recently used
    assert cache.evict(3) == 3
    assert (cache.match(older).length, cache.match(newer).length) == (6, 0), "the hit prefix was evicted"
