"""The prefix cache: shared prefixes are computed once, outputs do not change, eviction never takes
a page in use, and every page is always exactly one of free / cached / in use."""

import itertools
import random

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
import pytest
import torch

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.kv.kv_pool import CACHED, FREE, SHARED, KVPool
from lightllm_nb.kv.prefix_cache import PrefixCache
from lightllm_nb.scheduling.request import Request
from tiny_models import hf_greedy

GREEDY = dict(temperature=0, ignore_eos=True)


def tiny_engine(folder, **kwargs):
    return Engine(str(folder), device="cpu", dtype="float64", progress=False, **kwargs)


def run(engine, prompts, max_tokens):
    """Greedy outputs, the StepEvents, and the request ids in prompt order."""
    events = []
    unsubscribe = engine.subscribe(events.append)
    results = engine.generate(prompt_token_ids=prompts, sampling=SamplingParams(max_tokens=max_tokens, **GREEDY))
    unsubscribe()
    return [r.token_ids for r in results], events, [r.request_id for r in results]


def shared_prefix_prompts(seed, count, prefix_len=40):
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 49152) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 9))] for _ in range(count - 1)]
    return prompts + [list(prompts[0])]  # an identical prompt: the hit must leave its last token to compute


@pytest.fixture(scope="module")
def shared_prefix_case(tiny_model):
    """Prompts sharing a 40-token prefix, and their greedy outputs from HF and from an engine
    without a prefix cache (with the prefill tokens that engine computed)."""
    folder, hf = tiny_model("llama")
    prompts = shared_prefix_prompts(seed=1, count=5)
    expected = [hf_greedy(hf, p, 5) for p in prompts]
    with tiny_engine(folder, kv_tokens=512, prefix_cache=False) as engine:
        plain, plain_events, _ = run(engine, prompts, 5)
        assert engine.pool.is_whole() and engine.stats()["kv_cached_tokens"] == 0
    assert plain == expected
    assert not any(d.kind == "prefix_hit" for e in plain_events for d in e.decisions)
    return folder, prompts, expected, sum(e.prefill_tokens for e in plain_events)


@pytest.mark.parametrize("page_size", [1, 4])
def test_shared_prefix_is_computed_once(shared_prefix_case, page_size):
    folder, prompts, expected, plain_prefill = shared_prefix_case
    with tiny_engine(folder, kv_tokens=512, page_size=page_size) as engine:
        cached, events, rid = run(engine, prompts, 5)
        assert engine.stats()["kv_cached_tokens"] > 0
        assert engine.clear_prefix_cache() > 0
        assert engine.pool.is_whole()
    assert cached == expected
    hits = {d.request_id: d.numbers["matched"] for e in events for d in e.decisions if d.kind == "prefix_hit"}
    whole_pages = 40 // page_size * page_size
    last_token_left = (len(prompts[0]) - 1) // page_size * page_size  # the identical prompt
    assert hits == {rid[1]: whole_pages, rid[2]: whole_pages, rid[3]: whole_pages, rid[4]: last_token_left}
    assert sum(e.prefill_tokens for e in events) == plain_prefill - sum(hits.values())
    # All five arrive together: the others wait a step for req-0's prefill instead of repeating it.
    assert any(d.kind == "defer" and f"{rid[0]} is computing" in d.reason for e in events for d in e.decisions)


@pytest.mark.parametrize("page_size", [4, 16])
def test_prompts_diverging_inside_a_page_share_only_whole_pages(tiny_model, page_size):
    # 38 shared tokens end inside a page for pages of 4 (9.5 pages) and of 16 (2.4 pages): the
    # page where they diverge must be computed again, not shared half right.
    folder, hf = tiny_model("llama")
    rng = random.Random(7)
    shared = [rng.randrange(3, 49152) for _ in range(38)]
    # Long enough that the page where they diverge would be matched if matching were not whole pages.
    prompts = [shared + [rng.randrange(3, 49152) for _ in range(rng.randint(12, 20))] for _ in range(4)]
    expected = [hf_greedy(hf, p, 5) for p in prompts]
    with tiny_engine(folder, kv_tokens=512, page_size=page_size) as engine:
        first, _, _ = run(engine, prompts[:1], 5)           # cached: the first prompt and its output
        rest, events, rids = run(engine, prompts[1:], 5)
        engine.clear_prefix_cache()
        assert engine.pool.is_whole()
    assert first + rest == expected
    hits = {d.request_id: d.numbers["matched"] for e in events for d in e.decisions if d.kind == "prefix_hit"}
    assert hits == {rid: 38 // page_size * page_size for rid in rids}


def test_cached_tokens_are_reclaimable_and_evicted_for_new_work(tiny_model):
    folder, _ = tiny_model("llama")
    rng = random.Random(3)
    with tiny_engine(folder, kv_tokens=96, scheduler="aggressive", max_running=4) as engine:
        events = []
        engine.subscribe(events.append, pages=True)
        for _ in range(4):  # each run leaves its tokens cached; later runs need that room back
            prompt = [rng.randrange(3, 49152) for _ in range(30)]
            engine.generate(prompt_token_ids=[prompt], sampling=SamplingParams(max_tokens=8, **GREEDY))
            assert events[-1].kv_free == engine.pool.capacity  # cached tokens count as free
            assert events[-1].kv_cached > 0
        assert any(d.kind == "evict" and d.numbers["evicted"] > 0 for e in events for d in e.decisions)
        assert set(events[-1].page_owner) <= {FREE, CACHED}
        engine.clear_prefix_cache()
        assert engine.pool.is_whole()


def test_preempted_request_resumes_from_the_cache(tiny_model):
    folder, _ = tiny_model("qwen2")
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randint(20, 30))] for _ in range(4)]
    setting = dict(kv_tokens=100, scheduler="aggressive", max_running=4)
    with tiny_engine(folder, prefix_cache=False, **setting) as engine:
        plain, plain_events, _ = run(engine, prompts, 10)
    with tiny_engine(folder, **setting) as engine:
        cached, events, _ = run(engine, prompts, 10)
        engine.clear_prefix_cache()
        assert engine.pool.is_whole()
    assert cached == plain
    decisions = [d for e in events for d in e.decisions]
    resumed = {d.request_id for d in decisions if d.kind == "resume"}
    assert resumed, "the tight budget was meant to force preemption"
    hits = {d.request_id: d.numbers["matched"] for d in decisions if d.kind == "prefix_hit"}
    assert resumed & hits.keys(), "a resumed request should find its own tokens in the cache"
    assert sum(e.prefill_tokens for e in events) < sum(e.prefill_tokens for e in plain_events)


# ---- the tree and the pool, driven directly --------------------------------------------------
class PrefixCacheMachine(RuleBasedStateMachine):
    """Random requests hold, compute, share and release prefixes while pages are evicted. Each
    computed position's slot records the tokens up to it, so a page reused while still in use
    (or cached under the wrong tokens) shows up as wrong contents."""

    @initialize(page_size=st.sampled_from([1, 2, 4]))
    def setup(self, page_size):
        self.pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=24, page_size=page_size,
                           max_requests=5, max_context=64, dtype=torch.float32, device=torch.device("cpu"))
        self.cache = PrefixCache(self.pool)
        self.running: list[Request] = []
        self.contents: dict[int, tuple] = {}   # slot -> the tokens up to and including its position
        self.ids = itertools.count()

    @precondition(lambda self: len(self.running) < 5)
    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=14))
    def admit(self, prompt):
        req = Request(f"r{next(self.ids)}", prompt, SamplingParams())
        req.row = self.pool.alloc_row()
        match = self.cache.match(req.token_ids[:-1])
        self.cache.hold(req.row, match)
        req.pages, req.num_computed = list(match.pages), match.length
        self.running.append(req)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), count=st.integers(1, 6), sampled=st.integers(0, 2))
    def compute(self, data, count, sampled):
        req = data.draw(st.sampled_from(self.running))
        if req.num_uncomputed == 0:
            req.token_ids.append(sampled)  # a decode step's new token
        n = min(count, req.num_uncomputed)
        need = self.pool.pages_for(req.num_computed + n) - len(req.pages)
        if need > 0:
            short = need - self.pool.num_free_pages
            if 0 < short <= self.cache.reclaimable_pages:
                assert self.cache.evict(short) == short
            pages = self.pool.alloc_pages(need, owner=req.row)
            if pages is None:
                return  # the scheduler would preempt someone here
            req.pages += pages
        for pos in range(req.num_computed, req.num_computed + n):
            slot = int(self.pool.slots(req.pages, pos, pos + 1)[0])
            assert self.pool.page_owner[slot // self.pool.page_size] == req.row, "writing into a shared page"
            self.contents[slot] = tuple(req.token_ids[:pos + 1])
        req.num_computed += n

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def share_prompt(self, data):
        req = data.draw(st.sampled_from(self.running))
        shared = self.cache.share_prompt(req.row, req.prompt_ids, req.pages, req.num_computed, req.user)
        if shared is not None:
            req.pages[:len(shared)] = shared

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def release(self, data):
        req = data.draw(st.sampled_from(self.running))
        self.release_pages(req)
        self.pool.free_row(req.row)
        self.running.remove(req)

    def release_pages(self, req):
        self.cache.release(req.row, req.token_ids, req.pages, req.num_computed, req.user)

    @rule(pages=st.integers(0, 8))
    def evict(self, pages):
        reclaimable = self.cache.reclaimable_pages
        assert self.cache.evict(pages) == min(pages, reclaimable)

    @invariant()
    def every_page_is_exactly_one_thing(self):
        if not hasattr(self, "pool"):
            return
        p, owner = self.pool.page_size, self.pool.page_owner
        rows = {r.row for r in self.running}
        tree_pages, reclaimable = {}, 0
        stack = [(self.cache._root, ())]
        while stack:
            node, before = stack.pop()
            path = before + tuple(node.tokens)
            for child in node.children.values():
                assert child.parent is node and len(child.tokens) == len(child.pages) * p > 0
                assert child.holders <= node.holders or node is self.cache._root, "references must be path-shaped"
                stack.append((child, path))
            if node is self.cache._root:
                continue
            assert node.holders <= rows
            expected_owner = (CACHED if not node.holders else SHARED if len(node.holders) > 1
                              else next(iter(node.holders)))
            for i, page in enumerate(node.pages):
                assert page not in tree_pages, "a page in two nodes"
                tree_pages[page] = node
                assert owner[page] == expected_owner
                for j in range(p):  # the page holds exactly the tokens the tree says
                    assert self.contents[page * p + j] == path[:len(before) + i * p + j + 1]
            reclaimable += len(node.pages) * (not node.holders)
        assert self.cache.reclaimable_pages == reclaimable
        assert self.cache.cached_tokens == len(tree_pages) * p
        own_pages = set()
        for req in self.running:
            held = self.cache.held(req.row)
            assert req.pages[:len(held.pages)] == held.pages
            for page in req.pages[len(held.pages):]:
                assert page not in tree_pages and page not in own_pages and owner[page] == req.row
                own_pages.add(page)
            for pos in range(req.num_computed):  # nothing a running request reads was evicted or reused
                slot = int(self.pool.slots(req.pages, pos, pos + 1)[0])
                assert self.contents[slot] == tuple(req.token_ids[:pos + 1])
            node = held.node
            while node is not self.cache._root:
                assert req.row in node.holders
                node = node.parent
        free = set(self.pool._free_pages)
        assert len(free) == self.pool.num_free_pages and (owner[list(free)] == FREE).all()
        assert free.isdisjoint(tree_pages) and free.isdisjoint(own_pages)
        assert len(free) + len(tree_pages) + len(own_pages) == self.pool.num_pages

    def teardown(self):
        if not hasattr(self, "pool"):
            return
        for req in self.running:
            self.release_pages(req)
            self.pool.free_row(req.row)
        self.cache.clear()
        assert self.pool.is_whole() and self.cache.cached_tokens == 0


# Derandomized: every run tries the same examples, so a wrong match found once is found every time.
PrefixCacheMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                                derandomize=True)
test_prefix_cache_invariants = PrefixCacheMachine.TestCase
