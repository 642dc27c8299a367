"""Prefix-cache scopes (issue 15), in pairs so no test can pass with caching off: one user reuses
their own prompt, another user sending the same prompt reuses nothing; with "shared" they do; an
operator-declared prefix is reused across users while the rest of each prompt is not."""

import random

import pytest
import torch

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.kv.cache_scope import CacheScopes, tokenize_shared_prefixes
from lightllm_nb.kv.kv_pool import KVPool
from lightllm_nb.kv.prefix_cache import PrefixCache
from lightllm_nb.scheduling.request import Request

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
RNG = random.Random(15)
SYSTEM = [RNG.randrange(3, 49152) for _ in range(40)]        # the declared course prompt
SECRET = [RNG.randrange(3, 49152) for _ in range(30)]        # alice's own question
OTHER = [RNG.randrange(3, 49152) for _ in range(30)]         # bob's own question


def tiny_engine(folder, **kwargs):
    return Engine(str(folder), device="cpu", dtype="float64", progress=False, kv_tokens=1024, **kwargs)


def ask(engine, user, prompt):
    """(output tokens, cached tokens, the prefix_hit decision's numbers or None) of one request."""
    events = []
    unsubscribe = engine.subscribe(events.append)
    [result] = engine.generate(prompt_token_ids=[prompt], sampling=GREEDY, user=user)
    unsubscribe()
    hits = [d.numbers for e in events for d in e.decisions if d.kind == "prefix_hit"]
    assert len(hits) <= 1
    return result.token_ids, result.metrics["cached_tokens"], hits[0] if hits else None


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("llama")[0]


@pytest.mark.parametrize("page_size", [1, 4])
def test_same_user_reuses_another_user_does_not(folder, page_size):
    prompt = SYSTEM + SECRET
    with tiny_engine(folder, page_size=page_size) as engine:
        assert engine.stats()["prefix_cache_scope"] == "user"  # the default
        first, cached, hit = ask(engine, "alice", prompt)
        assert cached == 0 and hit is None
        again, cached, hit = ask(engine, "alice", prompt)
        whole = (len(prompt) - 1) // page_size * page_size     # the last token is always computed
        assert cached == whole and hit == {"matched": whole, "tokens": len(prompt), "own": whole,
                                           "declared": 0, "shared": 0}
        theirs, cached, hit = ask(engine, "bob", prompt)
        assert cached == 0 and hit is None, "bob reused alice's cached prompt"
        mine_again, cached, _ = ask(engine, "bob", prompt)
        assert cached == whole, "bob's own copy is cached under his scope"
        assert first == again == theirs == mine_again
        engine.clear_prefix_cache()
        assert engine.pool.is_whole()


def test_shared_scope_reuses_across_users(folder):
    prompt = SYSTEM + SECRET
    with tiny_engine(folder, prefix_cache_scope="shared") as engine:
        first, cached, _ = ask(engine, "alice", prompt)
        assert cached == 0
        theirs, cached, hit = ask(engine, "bob", prompt)
        assert cached == len(prompt) - 1 and hit["shared"] == cached and hit["own"] == hit["declared"] == 0
        assert first == theirs


def test_declared_prefix_is_reused_across_users_the_rest_is_not(folder):
    with tiny_engine(folder, shared_prefixes=[SYSTEM]) as engine:
        assert engine.stats()["shared_prefix_tokens"] == [len(SYSTEM)]
        alice, cached, _ = ask(engine, "alice", SYSTEM + SECRET)
        assert cached == 0
        # bob sends alice's very prompt: only the public part is reused, her question is not.
        bob, cached, hit = ask(engine, "bob", SYSTEM + SECRET)
        assert cached == len(SYSTEM) and hit["declared"] == len(SYSTEM) and hit["own"] == 0
        assert bob == alice
        _, cached, hit = ask(engine, "carol", SYSTEM + OTHER)
        assert cached == len(SYSTEM) and hit["declared"] == len(SYSTEM)
        # alice again: the declared part and her own question, each from its scope.
        _, cached, hit = ask(engine, "alice", SYSTEM + SECRET)
        assert cached == len(SYSTEM + SECRET) - 1
        assert hit["declared"] == len(SYSTEM) and hit["own"] == len(SECRET) - 1
        # A prompt that leaves the declared text part way shares only the part before it.
        _, cached, hit = ask(engine, "dave", SYSTEM[:25] + OTHER)
        assert cached == 25 and hit["declared"] == 25
        engine.clear_prefix_cache()
        assert engine.pool.is_whole()


def test_requests_arriving_together_wait_for_each_other_only_within_a_scope(folder):
    """A prefill in flight makes a request with the same next tokens wait a step (to reuse it).
    Across users that wait would itself be the side channel: bob's first token would come later
    exactly when alice is sending the same prompt. The declared prefix is still computed once."""

    with tiny_engine(folder) as engine:
        for user, prompt in [("alice", SYSTEM + SECRET), ("bob", SYSTEM + SECRET)]:
            engine.add_request(prompt_token_ids=prompt, sampling=GREEDY, user=user)
        decisions = []
        engine.subscribe(lambda e: decisions.extend(e.decisions))
        while engine.has_unfinished():
            engine.step()
        assert not [d for d in decisions if d.kind == "defer"], "bob waited on alice's prefill"
        assert not [d for d in decisions if d.kind == "prefix_hit"]
    with tiny_engine(folder, shared_prefixes=[SYSTEM]) as engine:
        for user, prompt in [("alice", SYSTEM + SECRET), ("bob", SYSTEM + OTHER)]:
            engine.add_request(prompt_token_ids=prompt, sampling=GREEDY, user=user)
        decisions = []
        engine.subscribe(lambda e: decisions.extend(e.decisions))
        while engine.has_unfinished():
            engine.step()
        assert [d.user for d in decisions if d.kind == "defer"] == ["bob"]
        [hit] = [d for d in decisions if d.kind == "prefix_hit"]
        assert hit.user == "bob" and hit.numbers["declared"] == len(SYSTEM)


def test_a_page_never_crosses_scopes_through_eviction_and_reinsertion():
    """Drive the tree directly: alice's pages are evicted and handed to bob, who computes and caches
    the same tokens in them; alice must not find them, bob must."""
    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=8, page_size=1, max_requests=2,
                  max_context=16, dtype=torch.float32, device=torch.device("cpu"))
    cache = PrefixCache(pool, CacheScopes("user"))
    tokens = [5, 6, 7, 8, 9, 10]

    def compute_and_release(user):
        req = Request(f"{user}-req", tokens, GREEDY, user=user)
        req.row = pool.alloc_row()
        match = cache.match(tokens, user)
        cache.hold(req.row, match)
        req.pages = match.pages + pool.alloc_pages(len(tokens) - match.length, owner=req.row)
        req.num_computed = len(tokens)
        cache.release(req.row, req.token_ids, req.pages, req.num_computed, req.user)
        pool.free_row(req.row)
        return req

    compute_and_release("alice")
    alice_pages = cache.match(tokens, "alice").pages
    assert len(alice_pages) == 6 and cache.match(tokens, "bob").length == 0
    assert cache.evict(6) == 6  # all of alice's cache goes
    compute_and_release("bob")
    bob = cache.match(tokens, "bob")
    assert sorted(bob.pages) == sorted(alice_pages), "the test meant bob to get alice's old pages"
    assert bob.length == 6 and cache.match(tokens, "alice").length == 0
    assert cache.clear() == 6 and pool.is_whole()


def test_bad_scope_settings_fail_before_the_model_loads(tmp_path):
    missing = str(tmp_path / "no-such-model")  # loading it would fail with a different message
    with pytest.raises(ValueError, match="prefix_cache_scope='everyone' is invalid: use 'user'"):
        Engine(missing, prefix_cache_scope="everyone")
    with pytest.raises(ValueError, match="prefix_cache=False turns off"):
        Engine(missing, prefix_cache=False, shared_prefixes=["You are a TA."])
    with pytest.raises(ValueError, match="wrap a single prefix in a list"):
        Engine(missing, shared_prefixes="You are a TA.")
    with pytest.raises(ValueError, match=r"shared_prefixes\[1\] is empty"):
        Engine(missing, shared_prefixes=["You are a TA.", []])
    with pytest.raises(ValueError, match=r"shared_prefixes\[0\] has keys \['text', 'tokens'\]"):
        Engine(missing, shared_prefixes=[{"text": "a", "tokens": [1]}])


def test_declared_chat_system_prompt_is_a_prefix_of_chats_that_start_with_it(folder, demo_tokenizer):
    system = [{"role": "system", "content": "You are the teaching assistant of CS101. Answer briefly."}]
    [declared] = tokenize_shared_prefixes([{"messages": system}], demo_tokenizer)
    with tiny_engine(folder, shared_prefixes=[system]) as engine:
        assert engine.stats()["shared_prefix_tokens"] == [len(declared)]
        hits = []
        engine.subscribe(lambda e: hits.extend(d for d in e.decisions if d.kind == "prefix_hit"))
        for user, question in [("alice", "What is a loop?"), ("bob", "What is a list?")]:
            ids = engine.chat_prompt_ids(system + [{"role": "user", "content": question}])
            assert tuple(ids[:len(declared)]) == declared
            engine.chat(system + [{"role": "user", "content": question}],
                        SamplingParams(max_tokens=2, temperature=0), user=user)
        [hit] = hits
        assert hit.user == "bob" and hit.numbers["declared"] == len(declared) and hit.numbers["own"] == 0
