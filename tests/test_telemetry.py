"""StepEvents: one per step, every decision with its reason, traces that round-trip, and a view
per user that hides everyone else's identity."""

import threading
import time

import pytest

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.telemetry.mailbox import Mailbox, MailboxClosed
from lightllm_nb.telemetry.traces import TraceRecorder, load_trace


def test_trace_round_trips_and_redaction_hides_other_users(tiny_model, tmp_path):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=64, scheduler="aggressive",
                max_running=4) as engine:
        events = []
        engine.subscribe(events.append, pages=True)
        recorder = TraceRecorder(tmp_path / "trace.jsonl")
        engine.subscribe(recorder)
        alice = [engine.add_request(prompt_token_ids=[10 + i] * 20, user="alice",
                                    sampling=SamplingParams(max_tokens=12, temperature=0)) for i in range(3)]
        bob = engine.add_request(prompt_token_ids=[7] * 25, user="bob",
                                 sampling=SamplingParams(max_tokens=12, temperature=0))
        while engine.has_unfinished():
            engine.step()
        recorder.close()

    assert [e.step for e in events] == list(range(1, len(events) + 1))
    assert load_trace(tmp_path / "trace.jsonl") == [
        type(e)(**{**e.__dict__, "page_owner": None}) for e in events]  # the trace asked for no pages
    kinds = {d.kind for e in events for d in e.decisions}
    assert {"admit", "finish", "preempt"} <= kinds, kinds
    assert all(d.reason for e in events for d in e.decisions)
    # page_size 1: a page per token; a map at most PAGE_MAPS_PER_SECOND, and with the last step
    assert all(e.page_owner is None or len(e.page_owner) == e.kv_capacity for e in events)
    assert events[0].page_owner is not None and events[-1].page_owner is not None

    for e in events:
        seen = e.redacted_for("alice")
        text = repr(seen)
        assert bob not in text and "bob" not in text
        assert all(r.request_id in alice for r in seen.rows if r.user == "alice")
        assert [r.tokens for r in seen.rows] == [r.tokens for r in e.rows]  # usage stays visible


def test_a_slow_callback_never_slows_a_step_and_traces_work_under_the_loop(tiny_model, tmp_path):
    import time

    import numpy as np

    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=256) as engine:
        seen, pages = [], []

        def slow(event):
            time.sleep(0.25)
            seen.append(event.step)

        unsubscribe_slow = engine.subscribe(slow, maxsize=2)
        unsubscribe_pages = engine.subscribe(lambda e: pages.append(e.page_owner), pages=True)
        recorder = TraceRecorder(tmp_path / "trace.jsonl")
        unsubscribe_trace = engine.subscribe(recorder)
        started = time.perf_counter()
        done = engine.client().generate(prompt_token_ids=[[5, 6, 7]],
                                        sampling=SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
        elapsed = time.perf_counter() - started
        steps = engine.stats()["steps"]
        for unsubscribe in (unsubscribe_slow, unsubscribe_pages, unsubscribe_trace):
            unsubscribe()  # each waits until its callback has seen what was published
        recorder.close()
    assert done.completion_tokens == 40
    assert elapsed < 40 * 0.25 / 2, "the step thread waited for a slow subscriber"
    assert len(seen) < steps, "the slow subscriber lost its oldest events instead"
    assert [e.step for e in load_trace(tmp_path / "trace.jsonl")] == list(range(1, steps + 1))
    assert len(pages) == steps and all(p is None or (p.dtype == np.int32 and len(p) == 256) for p in pages)
    assert pages[0] is not None and pages[-1] is not None  # maps at most PAGE_MAPS_PER_SECOND, and the last


def test_a_mailbox_hands_over_all_it_holds_at_once_and_drops_the_oldest_when_full():
    mailbox = Mailbox(maxsize=3)
    assert mailbox.get_all(timeout=0) == []
    for i in range(5):
        mailbox.put(i)
    assert mailbox.get_all() == [2, 3, 4] and mailbox.dropped == 2
    start = time.monotonic()
    assert mailbox.get_all(timeout=0.05) == []
    assert time.monotonic() - start >= 0.05
    threading.Timer(0.05, mailbox.put, args=("late",)).start()
    assert mailbox.get_all(timeout=30) == ["late"]  # a waiting reader wakes when it arrives
    mailbox.put("last")
    mailbox.close()
    assert mailbox.get_all() == ["last"]  # closed: what is left first, then the end
    with pytest.raises(MailboxClosed):
        mailbox.get_all()


def test_rows_and_holders_read_long_after_their_step_describe_that_step(tiny_model):
    """The step thread leaves an event's rows and KV holders for its reader to build (issue 10): a
    reader that takes every event only after the last step still gets each step's own numbers."""
    folder, _ = tiny_model("llama")
    prompts = {20: 11, 33: 12, 9: 13}  # prompt length: its token
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=512, max_batch_tokens=16, seed=0) as engine:
        late = engine.driver().subscribe(maxsize=10_000)
        done = engine.client().generate(prompt_token_ids=[[token] * n for n, token in prompts.items()],
                                        sampling=SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
        late.close()
        events = list(late)
    assert all(type(e.rows) is list and type(e.kv_holders) is list for e in events)  # built, nothing lazy left
    prompt_of = {c.request_id: c.prompt_tokens for c in done}
    context = {}
    for event in events:
        holders = {h.request_id: h.tokens for h in event.kv_holders}
        for row in event.rows:
            before = context.get(row.request_id, 0)
            assert row.context == before + row.tokens, (event.step, row)
            assert row.phase == ("prefill" if before < prompt_of[row.request_id] else "decode"), (event.step, row)
            assert holders.get(row.request_id, row.context) == row.context, (event.step, row)  # gone once finished
            context[row.request_id] = row.context
    # The last token sampled is never computed: a request ends at prompt + max_tokens - 1.
    assert context == {rid: n + 7 - 1 for rid, n in prompt_of.items()}


def test_a_closed_engine_lets_go_of_its_kv_pool_after_a_reader_of_pages(tiny_model):
    """The hub keeps the newest step's page-map source for a reader that copies the map itself;
    closing must drop it, or the pool (its K/V buffers: most of a GPU's memory) outlives the engine."""
    import gc
    import weakref

    folder, _ = tiny_model("llama")
    engine = Engine(str(folder), device="cpu", progress=False, kv_tokens=256)
    engine.subscribe(lambda event: None, pages=True)
    engine.generate(["hello"], SamplingParams(max_tokens=3))
    pool = weakref.ref(engine.pool)
    engine.close()
    gc.collect()
    assert pool() is None
