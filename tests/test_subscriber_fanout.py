"""One upstream subscription serving many readers (a front end's hub, `serve --api-server-count N`)
and rate-capped callbacks (the panels): what the upstream must carry, retuning it without a gap,
losses told to every reader, and a drawing callback that never holds a single-threaded step."""

import asyncio
import random
import threading
import time

import numpy as np

from lightllm_nb.telemetry.events import BatchRow
from lightllm_nb.telemetry.hub import Demand, EventHub
from test_subscriber_rate import step_event


def test_demand_is_what_serves_every_reader_and_changes_are_announced():
    changes = []
    hub = EventHub(on_change=lambda: changes.append(hub.demand()))
    assert hub.demand() is None
    rng = random.Random()
    rates = [rng.uniform(0.5, 50) for _ in range(3)]
    slow = hub.subscribe(user="a", max_rate=rates[0])
    fast = hub.subscribe(user="b", max_rate=rates[1], pages=True)
    assert hub.demand() == Demand(pages=True, max_rate=max(rates[:2]))
    every = hub.subscribe(user="c", max_rate=None)
    assert hub.demand() == Demand(pages=True, max_rate=None)
    every.close()
    fast.close()
    fast.close()  # a second close announces nothing
    assert changes == [Demand(False, rates[0]), Demand(True, max(rates[:2])), Demand(True, None),
                       Demand(True, max(rates[:2])), Demand(False, rates[0])]
    slow.close()
    assert changes[-1] is None and len(changes) == 6 and len(hub) == 0


def test_a_retuned_subscription_changes_from_the_next_step_without_a_gap_or_a_repeat():
    hub = EventHub()
    upstream = hub.subscribe(maxsize=100)
    owners = np.arange(64, dtype=np.int32)
    for step in range(1, 7):
        if step == 4:
            upstream.retune(pages=True, max_rate=None)
        hub.publish(step_event(step, running=int(step < 6)), lambda: owners)
    hub.close()
    seen = list(upstream)
    assert [e.step for e in seen] == list(range(1, 7))
    # A map from step 4 on: at once, then not again within 1/PAGE_MAPS_PER_SECOND, but with the last step.
    assert [e.page_owner is not None for e in seen] == [False] * 3 + [True, False, True]
    assert np.array_equal(seen[-1].page_owner, owners) and seen[-1].page_owner is not owners  # a copy


def test_events_lost_upstream_are_counted_by_every_reader_there():
    hub = EventHub()
    readers = [hub.subscribe(user=f"u{i}") for i in range(3)]
    hub.report_lost(5)
    late = hub.subscribe()
    hub.report_lost(2)
    assert [r.dropped for r in readers] == [7, 7, 7] and late.dropped == 2


def test_a_step_without_a_page_map_reaches_a_reader_that_asked_for_pages_without_one():
    hub = EventHub()
    reader = hub.subscribe(pages=True)
    hub.publish(step_event(1), lambda: None)  # a front end's upstream before it carries pages
    hub.close()
    assert [e.page_owner for e in reader] == [None]


def test_a_rate_capped_callback_gets_every_decision_and_is_never_waited_for():
    hub = EventHub()
    collected, drawn = [], []
    hub.subscribe_callback(collected.append)
    blocked = threading.Event()
    drawing = hub.subscribe_callback(lambda e: (drawn.append(e), blocked.wait(30)), max_rate=20)
    for step in range(1, 41):
        hub.publish(step_event(step), lambda: None)
        started = time.monotonic()
        hub.flush()  # what a single-threaded Engine.step does: waits for `collected`, not for the drawing
        assert time.monotonic() - started < 5
        assert collected[-1].step == step
    blocked.set()
    deadline = time.monotonic() + 10
    while (not drawn or drawn[-1].step != 40) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert drawn[-1].step == 40 and len(drawn) < 40
    assert [d.numbers["step"] for e in drawn for d in e.decisions] == list(range(1, 41))
    started = time.monotonic()
    drawing.close()
    assert time.monotonic() - started < 1
    hub.close()


def test_every_layer_passes_max_rate_down_and_keeps_every_decision(tiny_model):
    """DriverLoop, LocalClient (sync and async) and the panels' Engine source, on a real engine."""
    from lightllm_nb import Engine, SamplingParams
    from lightllm_nb.notebook.panels.sources import follow

    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=512, seed=0) as engine:
        client = engine.client(user="alice")
        every = engine.driver().subscribe(maxsize=10_000)
        capped = {"driver": engine.driver().subscribe(maxsize=10_000, max_rate=1000),
                  "client": client.subscribe(maxsize=10_000, max_rate=1000),
                  "aclient": asyncio.run(client.asubscribe(maxsize=10_000, max_rate=1000))}
        drawn = []
        unfollow = follow(engine, drawn.append, pages=True, max_rate=1000)
        assert all(s.max_rate == 1000 for s in capped.values())
        assert [s.max_rate for s in engine._events._subscriptions][-1] == 1000  # the panel's callback
        client.generate(["one two three"] * 3, SamplingParams(max_tokens=12, ignore_eos=True, temperature=0))
        steps = engine.stats()["steps"]
        deadline = time.monotonic() + 30
        while (not drawn or drawn[-1].step != steps) and time.monotonic() < deadline:
            time.sleep(0.01)
        unfollow()
        for subscription in [every, *capped.values()]:
            subscription.close()
        full = list(every)
        kinds = [(d.kind, d.code) for e in full for d in e.decisions]
        for name, subscription in capped.items():
            seen = list(subscription)
            assert seen[-1].step == steps and [(d.kind, d.code) for e in seen for d in e.decisions] == kinds, name
        assert len(full) == steps and [(d.kind, d.code) for e in drawn for d in e.decisions] == kinds
        assert drawn[-1].page_owner is not None


def test_an_event_crosses_to_a_front_end_unchanged():
    import pickle

    from lightllm_nb.serving.event_wire import pack, unpack
    from test_subscriber_views import random_event

    rng = random.Random()
    for _ in range(20):
        event = random_event(rng, rng.randrange(1, 40))  # with or without KV holders, with a page map
        received = unpack(pickle.loads(pickle.dumps(pack(event))))
        assert received.to_dict() == event.to_dict() and isinstance(received.rows[0], BatchRow)


def test_a_capped_reader_gets_the_last_event_of_a_closed_hub():
    """Closed with one event left: that event, then the end (it raised MailboxClosed before)."""
    hub = EventHub()
    capped = hub.subscribe(max_rate=1000)
    hub.publish(step_event(1), lambda: None)
    hub.close()
    assert [e.step for e in capped] == [1]

    async def read_all():
        return [e.step async for e in async_capped]

    async_capped = hub.subscribe(max_rate=1000)
    hub.publish(step_event(2), lambda: None)
    async_capped._mailbox.close()
    assert asyncio.run(read_all()) == [2]
