"""Exact memory accounting and preemption choices of the real scheduler, driven without a model:
which request is preempted, how many pages each request holds at page multiples and one over,
what the pool says is free right after admission, and where the policies draw their lines."""

import pytest

from lightllm_nb.notebook.panels.kv_grid import CACHED_CELL, FREE_CELL, SHARED_CELL, KVGrid
from lightllm_nb.scheduling.admission import AggressivePolicy, ConservativePolicy, PoolView
from lightllm_nb.sampling_params import SamplingParams
from lightllm_nb.scheduling.request import PENDING_TOKEN, Request
from model_free import HANG_SECONDS, SAMPLED, make_scheduler, request, run, step

pytestmark = pytest.mark.timeout(HANG_SECONDS)


def pages_by_hand(tokens, page_size):
    return (tokens + page_size - 1) // page_size


def preempted(history):
    return [d.request_id for decisions in history for d in decisions if d.kind == "preempt"]


def step_until_preempted(scheduler, history, steps=200):
    """Step until someone is preempted; a bounded loop, so a scheduler that never preempts (or
    never makes progress) fails here instead of hanging the test."""
    for _ in range(steps):
        if preempted(history):
            return
        history.append(step(scheduler))
    assert preempted(history), f"nobody was preempted in {steps} steps"


def admit_one_per_step(scheduler, rids, **kwargs):
    """Admit `rids` on consecutive steps, so their age order is known."""
    history = []
    for rid in rids:
        scheduler.add(request(rid, **kwargs))
        history.append(step(scheduler))
    return history


# ---- who is preempted ----------------------------------------------------------------------------
def test_the_newest_request_is_preempted_first():
    # 3 requests of 8 + up to 10 tokens in 30 slots: they fit until the oldest needs its 12th token.
    scheduler = make_scheduler(capacity=30, max_running=3)
    history = admit_one_per_step(scheduler, ["old", "mid", "new"], prompt_len=8, max_tokens=10)
    step_until_preempted(scheduler, history)
    assert preempted(history) == ["new"], "the newest goes first, not the oldest or the middle one"
    assert [r.request_id for r in scheduler.running] == ["old", "mid"]
    history += run(scheduler)
    assert "old" not in preempted(history), "the oldest request is never the victim while others are newer"


def test_the_newest_of_the_lowest_priority_is_preempted_before_a_newer_higher_one():
    scheduler = make_scheduler(capacity=30, max_running=3)
    history = admit_one_per_step(scheduler, ["low-old"], prompt_len=8, max_tokens=10)
    history += admit_one_per_step(scheduler, ["low-new"], prompt_len=8, max_tokens=10)
    history += admit_one_per_step(scheduler, ["high"], prompt_len=8, max_tokens=10, priority=1)
    step_until_preempted(scheduler, history)
    assert preempted(history) == ["low-new"]


def test_a_request_outranked_by_everyone_else_preempts_itself():
    scheduler = make_scheduler(capacity=20, max_running=2)
    history = admit_one_per_step(scheduler, ["high"], prompt_len=8, max_tokens=10, priority=1)
    history += admit_one_per_step(scheduler, ["low"], prompt_len=8, max_tokens=10)
    step_until_preempted(scheduler, history)
    # "low" is the one that finds the pool dry (it is scheduled after "high"): it gives way itself.
    assert preempted(history) == ["low"]
    assert [r.request_id for r in scheduler.running] == ["high"]
    assert scheduler.running[0].num_preemptions == 0


def test_the_lowest_priority_goes_first_even_when_it_is_the_oldest():
    # priorities 0 (oldest), 1 and 2 (newest) in 30 slots: "high" decodes first each step, so it is
    # the one that finds the pool dry; the victim is the lowest priority, not merely a lower one.
    scheduler = make_scheduler(capacity=30, max_running=3)
    history = []
    for rid, priority in (("low", 0), ("mid", 1), ("high", 2)):
        history += admit_one_per_step(scheduler, [rid], prompt_len=8, max_tokens=10, priority=priority)
    step_until_preempted(scheduler, history)
    [decision] = [d for decisions in history for d in decisions if d.kind == "preempt"]
    assert (decision.request_id, decision.code, decision.related[0][0]) == ("low", "preempted_for", "high")


def test_a_request_never_preempts_one_already_in_this_steps_batch():
    # 15 slots: "low" (priority 0) decodes, "high" (priority 1, 10 prompt tokens) is prefilled 3 a
    # step. At the 4th step low's decode takes a page first (decodes go first); high's chunk then
    # needs 3 pages with 2 free. low is in the batch already, so high gives way itself.
    scheduler = make_scheduler(capacity=15, max_running=2, max_batch_tokens=4)
    low, high = request("low", prompt_len=4, max_tokens=30), request("high", prompt_len=10, priority=1)
    scheduler.add(low)
    step(scheduler)
    scheduler.add(high)
    step(scheduler)
    step(scheduler)
    batch = scheduler.schedule()
    assert [(d.request_id, d.code) for d in batch.decisions if d.kind == "preempt"] == [("high", "pool_full")]
    assert [(req.request_id, n) for req, n in batch.items] == [("low", 1)]
    assert low.status.name == "RUNNING" and low.num_preemptions == 0


# ---- pages held, page multiples and one over ------------------------------------------------------
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("over", [0, 1], ids=["exact-multiple", "one-over"])
def test_pages_held_after_admission_and_each_decode(page_size, over):
    pages_total = 8
    prompt_len = 3 * page_size + over
    scheduler = make_scheduler(capacity=pages_total * page_size, page_size=page_size, max_batch_tokens=256)
    req = request("r", prompt_len=prompt_len, max_tokens=page_size + 2)
    scheduler.add(req)
    batch = scheduler.schedule()
    assert batch.items == [(req, prompt_len)]
    assert len(req.pages) == 3 + over, "a prompt of whole pages holds exactly those pages; one token more, one page more"
    assert scheduler.pool.free_tokens == scheduler.pool_view().free == (pages_total - 3 - over) * page_size
    assert (scheduler.pool.page_owner[req.pages] == req.row).all()
    assert (scheduler.pool.page_owner == req.row).sum() == 3 + over
    assert not scheduler.pool.is_whole(), "pages in use: the pool is not whole"
    req.num_computed += prompt_len
    req.token_ids.append(SAMPLED)
    while not req.finished:
        scheduler.schedule()
        held = pages_by_hand(len(req.token_ids), page_size)   # every known token gets computed this step
        assert len(req.pages) == held, f"{len(req.token_ids)} tokens in pages of {page_size}"
        assert scheduler.pool.free_tokens == (pages_total - held) * page_size
        req.num_computed = len(req.token_ids)
        req.token_ids.append(SAMPLED)
        if req.num_output >= req.sampling.max_tokens:
            scheduler.finish(req, "length")
    assert scheduler.pool.is_whole()
    row = scheduler.pool.alloc_row()
    assert not scheduler.pool.is_whole(), "every page is free but a row is not: that is a leak too"
    scheduler.pool.free_row(row)


@pytest.mark.parametrize("page_size", [4, 16])
def test_a_finished_request_leaves_exactly_its_computed_whole_pages_cached(page_size):
    scheduler = make_scheduler(capacity=8 * page_size, page_size=page_size, prefix_cache=True)
    req = request("r", prompt_len=2 * page_size - 1, max_tokens=page_size + 3)
    scheduler.add(req)
    run(scheduler)
    computed = len(req.token_ids) - 1   # the last sampled token is never computed
    cached = computed // page_size * page_size
    assert scheduler.cache.cached_tokens == scheduler.reclaimable_tokens == cached
    assert scheduler.pool.free_tokens == 8 * page_size - cached
    assert scheduler.pool_view().free == 8 * page_size, "unused cached pages count as free"
    assert scheduler.clear_prefix_cache().numbers["evicted"] == cached
    assert scheduler.pool.is_whole()


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_prompt_diverging_inside_a_cached_prefix_reuses_the_whole_pages_before_it(page_size):
    # the first request leaves one node of 12 tokens; the second departs from it at token 6, in its
    # second page of 4 (the lookup finds the node by its first page, the rest is compared token by token)
    scheduler = make_scheduler(capacity=32, page_size=page_size, prefix_cache=True)
    scheduler.add(request("first", prompt_len=13, max_tokens=1))
    run(scheduler)
    scheduler.add(Request("second", list(range(10, 16)) + [99] * 7, SamplingParams(max_tokens=1)))
    [hit] = [d for d in step(scheduler) if d.kind == "prefix_hit"]
    assert hit.numbers["matched"] == 6 // page_size * page_size


def test_a_prefix_hit_points_the_rows_first_positions_at_the_cached_pages():
    """The runner never computes a cached prefix, so it never maps those positions either: the
    scheduler writes them into req_to_token when it admits the request."""
    scheduler = make_scheduler(capacity=32, page_size=4, prefix_cache=True)
    scheduler.add(request("first", prompt_len=9, max_tokens=2))
    run(scheduler)  # its two whole prompt pages stay cached
    second = request("second", prompt_len=9, max_tokens=2)
    scheduler.add(second)
    [hit] = [d for d in step(scheduler) if d.kind == "prefix_hit"]
    assert hit.numbers["matched"] == 8
    expected = [page * 4 + i for page in second.pages[:2] for i in range(4)]
    assert scheduler.pool.req_to_token[second.row, :8].tolist() == expected


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_prompt_that_needs_exactly_every_reclaimable_page_evicts_them_all(page_size):
    """Free pages plus unused cached pages are exactly what the prompt needs: evict the whole cache
    and admit it now (evicting is refused only when it cannot free enough). The evict decision
    counts what it freed in tokens, not pages."""
    scheduler = make_scheduler(capacity=16 * page_size, page_size=page_size, prefix_cache=True)
    scheduler.add(request("first", prompt_len=8 * page_size, max_tokens=1))
    run(scheduler)
    assert scheduler.cache.reclaimable_pages == 8 and scheduler.pool.num_free_pages == 8
    other = Request("other", list(range(1000, 1000 + 16 * page_size)), SamplingParams(max_tokens=2))  # no common prefix
    scheduler.add(other)
    decisions = step(scheduler)
    assert [(d.kind, d.numbers["evicted"]) for d in decisions if d.kind == "evict"] == [("evict", 8 * page_size)]
    assert scheduler.running == [other] and len(other.pages) == 16 and scheduler.pool.num_free_pages == 0


# ---- where the policies draw the line ---------------------------------------------------------------
def test_conservative_reserves_whole_pages_and_admits_at_exactly_capacity():
    policy = ConservativePolicy()
    view = PoolView(capacity=64, free=64, page_size=16)
    running = [request("a", prompt_len=9, max_tokens=8)]            # 17 tokens: 2 pages, 32 slots
    fits = policy.check(request("b", prompt_len=16, max_tokens=16), running, view)   # 32 more: 64
    assert fits.admit and fits.numbers == {"reserved": 32, "need": 32, "capacity": 64}
    over = policy.check(request("c", prompt_len=16, max_tokens=17), running, view)   # 33: 3 pages
    assert not over.admit and over.numbers == {"reserved": 32, "need": 48, "capacity": 64}


def test_aggressive_admits_a_prompt_that_fills_the_free_pages_exactly():
    policy = AggressivePolicy()
    view = PoolView(capacity=64, free=32, page_size=16)
    fits = policy.check(request("a", prompt_len=17, max_tokens=100), [], view)
    assert fits.admit and fits.numbers == {"need": 32, "free": 32, "capacity": 64}
    over = policy.check(request("b", prompt_len=33, max_tokens=1), [], view)
    assert not over.admit and over.numbers["need"] == 48


def test_the_scheduler_admits_up_to_exactly_the_pool_and_not_a_page_more():
    # Conservative, pages of 4, 32 slots: "a" reserves 12 + 4 = 16 and "b" the other 16.
    scheduler = make_scheduler(capacity=32, page_size=4, policy=ConservativePolicy())
    for rid in ("a", "b", "c"):
        scheduler.add(request(rid, prompt_len=12, max_tokens=4))
    decisions = step(scheduler)
    assert [d.request_id for d in decisions if d.kind == "admit"] == ["a", "b"]
    assert [d.request_id for d in decisions if d.kind == "defer"] == ["c"]
    assert scheduler.pool.free_tokens == 32 - 2 * 12, "each holds its 12 computed prompt tokens: 3 pages"


# ---- admission limits ------------------------------------------------------------------------------
def test_max_running_caps_admission_even_with_rows_to_spare():
    scheduler = make_scheduler(max_running=2, rows=8)
    for rid in "abcd":
        scheduler.add(request(rid))
    decisions = step(scheduler)
    assert [d.request_id for d in decisions if d.kind == "admit"] == ["a", "b"]
    assert len(scheduler.running) == 2


def test_a_preempted_request_with_its_token_in_flight_does_not_hold_up_others():
    scheduler = make_scheduler()
    a = request("a")
    scheduler.add(a)
    step(scheduler)
    scheduler.preempt(a, [], needed_by=a)
    a.token_ids[-1] = PENDING_TOKEN   # overlapped steps: its newest token is still on the GPU
    scheduler.add(request("b"))
    decisions = scheduler.schedule().decisions
    assert [d.request_id for d in decisions if d.kind in ("admit", "resume")] == ["b"], \
        "a waits a step for its token; b behind it is admitted now"



def test_a_request_whose_last_token_is_in_flight_does_not_hold_up_the_step():
    scheduler = make_scheduler()
    done, going = request("done", max_tokens=1), request("going", max_tokens=5)
    scheduler.add(done)
    scheduler.add(going)
    for req, n in scheduler.schedule().items:
        req.num_computed += n
        req.add_pending_token()  # overlapped steps: the sampled tokens are still on the GPU
    assert done.awaiting_final and not going.awaiting_final
    assert [req.request_id for req, _ in scheduler.schedule().items] == ["going"], \
        "nothing is left to compute for 'done'; 'going' after it decodes as usual"


def test_a_decode_gets_its_token_every_step_while_a_long_prompt_is_prefilled_in_chunks():
    scheduler = make_scheduler(max_batch_tokens=8)
    decoding, prompt = request("decoding", max_tokens=6), request("prompt", prompt_len=30, max_tokens=1)
    scheduler.add(decoding)
    step(scheduler)
    scheduler.add(prompt)
    while prompt.num_computed < prompt.num_prompt:
        batch = scheduler.schedule()
        assert ("decoding", 1) in [(req.request_id, n) for req, n in batch.items], \
            "the prefill chunk took the whole budget: the decode starved"
        for req, n in batch.items:
            req.num_computed += n
        decoding.token_ids.append(SAMPLED)

# ---- what the pool tells the KV panel ----------------------------------------------------------------
def test_the_kv_grid_reads_the_pools_page_owners():
    """`page_owner` is what the KV panel draws: cached, shared and free pages must carry the codes
    the grid decodes (it keeps its own copy of them, as the browser does)."""
    scheduler = make_scheduler(capacity=16, prefix_cache=True)
    scheduler.add(request("first", prompt_len=8, max_tokens=1))
    run(scheduler)
    grid = KVGrid()
    grid.update(scheduler.pool.page_owner)
    assert grid.owners.tolist() == [CACHED_CELL] * 8 + [FREE_CELL] * 8 and grid.row_pages == {}
    for rid in ("b", "c"):  # the same prompt: both hold its first 7 tokens from the cache
        scheduler.add(request(rid, prompt_len=8, max_tokens=3))
        step(scheduler)
    grid.update(scheduler.pool.page_owner)
    assert grid.owners.tolist()[:7] == [SHARED_CELL] * 7
    assert set(grid.row_pages) == {r.row for r in scheduler.running} == {0, 1}


def test_a_pool_of_exactly_one_page_is_accepted_and_less_is_refused():
    pool = make_scheduler(capacity=4, page_size=4, max_running=1).pool
    assert (pool.num_pages, pool.capacity) == (1, 4)
    with pytest.raises(ValueError, match="kv_tokens=3 is too small"):
        make_scheduler(capacity=3, page_size=4, max_running=1)


@pytest.mark.parametrize("page_size", [1, 4])
def test_the_padding_page_and_row_lie_inside_the_buffers_past_every_live_one(page_size):
    """Padded entries of a CUDA-graph batch write K/V into the dummy page through the dummy row: both
    must exist in the buffers the models see, and no live page or request may use them."""
    pool = make_scheduler(capacity=8 * page_size, page_size=page_size, max_running=3).pool
    buffers = pool.buffers
    assert buffers.k_cache.shape[1] >= pool.dummy_slot + page_size <= buffers.v_cache.shape[1]
    live = pool.slots(pool.alloc_pages(pool.num_pages, owner=0), 0, pool.capacity)
    assert live.max() < pool.dummy_slot, "a live page overlaps the dummy page"
    rows = [pool.alloc_row() for _ in range(3)]
    assert pool.alloc_row() is None and pool.dummy_row not in rows
    assert (buffers.req_to_token[pool.dummy_row] == pool.dummy_slot).all()
