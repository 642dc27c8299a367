"""share_prompt when two requests computed the same prompt at once: the second one's duplicate
pages are swapped for the tree's and freed, and its row of req_to_token must follow (the attention
kernels read K/V through that row, never through `req.pages`). Model-free: the pool and the cache
driven directly, with req_to_token written the way the model runner writes it."""

import pytest
import torch

from lightllm_nb import SamplingParams
from lightllm_nb.kv.kv_pool import FREE, SHARED, KVPool
from lightllm_nb.kv.prefix_cache import PrefixCache
from lightllm_nb.scheduling.request import Request


def compute_prompt(pool, cache, req):
    """What a prefill step does for `req`: pages for its whole prompt, each position's slot
    written into its row of req_to_token (as the model runner does), then share_prompt."""
    need = pool.pages_for(req.num_prompt) - len(req.pages)
    req.pages += pool.alloc_pages(need, owner=req.row)
    positions = torch.arange(req.num_computed, req.num_prompt)
    slots = torch.from_numpy(pool.slots(req.pages, req.num_computed, req.num_prompt))
    pool.map_positions(torch.full_like(positions, req.row), positions, slots)
    req.num_computed = req.num_prompt
    shared = cache.share_prompt(req.row, req.prompt_ids, req.pages, req.num_computed, req.user)
    if shared is not None:  # as the scheduler does
        req.pages[:len(shared)] = shared


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_duplicate_prompt_is_remapped_to_the_trees_pages(page_size):
    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=64, page_size=page_size,
                  max_requests=4, max_context=32, dtype=torch.float32, device=torch.device("cpu"))
    cache = PrefixCache(pool)
    prompt = list(range(3, 3 + 2 * 4 + 1))  # two whole pages of 4 and one token more
    a, b = (Request(rid, list(prompt), SamplingParams()) for rid in ("a", "b"))
    for req in (a, b):  # both admitted before either computed anything: neither hits the cache
        req.row = pool.alloc_row()
        match = cache.match(req.token_ids[:-1])
        cache.hold(req.row, match)
        assert match.length == 0
    compute_prompt(pool, cache, a)   # the tree takes a's pages
    mine = list(b.pages)
    compute_prompt(pool, cache, b)   # b computed the same tokens into pages of its own: duplicates

    length = len(prompt) // page_size * page_size
    shared = a.pages[:length // page_size]
    assert b.pages[:length // page_size] == shared
    assert set(mine[:length // page_size]).isdisjoint(shared)
    assert all(pool.page_owner[page] == SHARED for page in shared)
    assert all(pool.page_owner[page] == FREE for page in mine[:length // page_size]), "duplicates not freed"
    # b's row must now read the tree's pages: the freed duplicates may be handed out and overwritten
    expected = torch.from_numpy(pool.slots(b.pages, 0, b.num_prompt)).to(torch.int32)
    assert pool.req_to_token[b.row, :b.num_prompt].tolist() == expected.tolist(), \
        "b's row of req_to_token still points at the freed duplicate pages"
    assert pool.req_to_token[b.row, :length].tolist() == pool.req_to_token[a.row, :length].tolist()

    for req in (a, b):
        cache.release(req.row, req.token_ids, req.pages, req.num_computed, req.user)
        pool.free_row(req.row)
    cache.clear()
    assert pool.is_whole()


@pytest.mark.parametrize("mode", ["user", "shared"])
def test_match_counts_reused_tokens_by_source(mode):
    """What a prefix hit reports (decisions, panels, timelines): declared tokens, then the rest as
    the user's own or as shared, adding up to the match and nothing more."""
    from lightllm_nb.kv.cache_scope import CacheScopes

    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=64, page_size=2,
                  max_requests=4, max_context=32, dtype=torch.float32, device=torch.device("cpu"))
    system = [5, 6, 7, 8]
    cache = PrefixCache(pool, CacheScopes(mode=mode, shared_prefixes=(system,)))
    prompt = system + [9, 10, 11, 12, 13]
    assert cache.match(prompt, "u").sources() == {"own": 0, "declared": 0, "shared": 0}
    assert cache.insert(prompt[:8], pool.alloc_pages(4, owner=0), "u") == []
    hit = cache.match(prompt, "u")
    declared = 4 if mode == "user" else 0
    rest = "own" if mode == "user" else "shared"
    assert hit.length == 8 and hit.declared == declared
    assert hit.sources() == {"own": 0, "declared": 0, "shared": 0} | {"declared": declared, rest: 8 - declared}
