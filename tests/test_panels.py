"""Panels against a real engine: what reaches the front end (comm messages, recorded) equals the
engine's real events and pool, the throttle bounds the messages, replay and close work."""

import json
import random
import threading
import time
from dataclasses import replace

import comm
import numpy as np
import pytest
from comm.base_comm import BaseComm

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.notebook.panels import Dashboard, KVCachePanel
from lightllm_nb.notebook.panels.kv_grid import CACHED_CELL, FREE_CELL, SHARED_CELL, KVGrid
from lightllm_nb.notebook.panels.pump import Pump
from lightllm_nb.telemetry.hub import EventHub
from lightllm_nb.telemetry.traces import TraceRecorder, load_trace

PAGE_TO_CELL = {-1: FREE_CELL, -2: CACHED_CELL, -3: SHARED_CELL}


class FrontEnd:
    """Every comm message the widgets send, as a Jupyter front end would receive them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = []  # (comm_id, msg_type, data, buffers, time)

    def make_comm(self, *args, **kwargs):
        front_end = self

        class RecordingComm(BaseComm):
            def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
                with front_end.lock:
                    front_end.sent.append((self.comm_id, msg_type, data, buffers, time.monotonic()))

        return RecordingComm(*args, **kwargs)

    def custom(self, view, since=0.0):
        with self.lock:
            return [(d["content"], b) for cid, kind, d, b, t in self.sent
                    if cid == view.comm.comm_id and kind == "comm_msg" and d.get("method") == "custom" and t >= since]

    def grid(self, view):
        """The KV grid as the browser holds it after applying every patch."""
        owners, meta = None, None
        for content, buffers in self.custom(view):
            if content["full"]:
                owners = np.full(content["cells"], FREE_CELL, dtype=np.int32)
            idx, own = np.frombuffer(buffers[0], np.int32), np.frombuffer(buffers[1], np.int32)
            owners[idx] = own
            meta = content
        return owners, meta

    def items(self, view):
        items = []
        for content, _ in self.custom(view):
            items = content["items"] if content["reset"] else items + content["items"]
        return items


@pytest.fixture
def front_end(monkeypatch):
    recorder = FrontEnd()
    monkeypatch.setattr(comm, "create_comm", recorder.make_comm)
    return recorder


@pytest.fixture
def engine(tiny_model):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=160, max_running=6, max_batch_tokens=48,
                scheduler="aggressive", seed=0) as engine:
        yield engine


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the panel did not catch up with the engine"
        time.sleep(0.02)


def expected_cells(page_owner):
    return np.array([PAGE_TO_CELL.get(int(o), int(o)) for o in page_owner], dtype=np.int32)


def add_requests(engine, n, max_tokens, prefix="The same long shared system prompt says hello. "):
    for i in range(n):
        engine.add_request(prefix + f"question {i}: " + "tell me more " * (i + 1),
                           SamplingParams(max_tokens=max_tokens, temperature=0.0))


def expected_holders(engine):
    """Every running request holding pages of its own, named (one user, unredacted), with its tokens:
    also those this step's batch skipped."""
    pool = engine.pool.page_owner
    held = {r.row: (r, int((pool == r.row).sum())) for r in engine.scheduler.running if r.row is not None}
    return {str(row): {"pages": n, "who": "mine", "request": r.request_id, "tokens": r.num_computed}
            for row, (r, n) in held.items() if n}


def test_dashboard_state_equals_the_engine_s_events_and_pool(engine, front_end):
    events = []
    engine.subscribe(events.append)
    dashboard = Dashboard(engine)
    trends, kv, batch, decisions = (part.view for part in dashboard.parts)
    add_requests(engine, 8, max_tokens=12)  # more than fit: defers, evictions, preemptions, prefix hits
    while engine.has_unfinished():
        engine.step()
        step = engine.stats()["steps"]
        wait_for(lambda: events and events[-1].step == step)
        wait_for(lambda: (front_end.grid(kv)[1] or {}).get("step") == step)
        owners, meta = front_end.grid(kv)
        assert meta["pages_per_cell"] == 1
        assert np.array_equal(owners, expected_cells(engine.pool.page_owner))  # the pool itself, right now
        assert meta["used"] == events[-1].kv_capacity - events[-1].kv_free
        assert meta["rows"] == expected_holders(engine)
    wait_for(lambda: front_end.items(decisions) and front_end.items(decisions)[-1]["step"] == events[-1].step
             or not any(e.decisions for e in events[-1:]))
    wait_for(lambda: front_end.items(batch) and front_end.items(batch)[-1]["step"] == events[-1].step)
    shown_steps = front_end.items(batch)
    assert [s["step"] for s in shown_steps] == [e.step for e in events[-60:]]
    for shown, event in zip(shown_steps, events[-60:]):
        assert [(r["request"], r["phase"], r["tokens"]) for r in shown["rows"]] == \
               [(r.request_id, r.phase, r.tokens) for r in event.rows]
    shown_decisions = [(d["step"], d["kind"], d["request"], d["reason"]) for d in front_end.items(decisions)]
    real = [(e.step, d.kind, d.request_id, d.reason) for e in events for d in e.decisions]
    assert shown_decisions == real
    kinds = {d[1] for d in real}
    assert {"admit", "finish", "prefix_hit"} <= kinds and kinds & {"defer", "preempt"}, kinds
    series = front_end.custom(trends)[-1][0]["values"]
    assert series["queue"][-1] == events[-1].waiting and len(series["ttft"]) > 0
    dashboard.close()


def test_throttle_bounds_messages_in_a_burst_and_the_latest_state_wins(engine, front_end):
    """The engine's real events, replayed through a real EventHub far faster than any panel
    should draw (thousands a second): each view still gets at most ~10 messages a second."""
    events = []
    engine.subscribe(events.append, pages=True)
    engine.generate([f"burst {i} " * 3 for i in range(4)], SamplingParams(max_tokens=6, temperature=0.0))
    wait_for(lambda: len(events) == engine.stats()["steps"])
    # A reader of every step gets a page map at most PAGE_MAPS_PER_SECOND: replay the steps that
    # carry one (the last, which leaves nothing running, always does), each with its own map.
    events = [event for event in events if event.page_owner is not None]
    assert events and events[-1].running == 0
    hub = EventHub()
    panel = Dashboard(hub, rate=10.0)
    started = time.monotonic()
    published = 0
    while time.monotonic() - started < 1.5:
        event = events[published % len(events)]
        hub.publish(replace(event, step=published + 1), lambda: event.page_owner)
        published += 1
    burst = time.monotonic() - started
    kv = panel.parts[1].view
    wait_for(lambda: (front_end.grid(kv)[1] or {}).get("step") == published)  # the latest state wins
    settled = time.monotonic() - started
    for part in panel.parts:
        sent = len(front_end.custom(part.view, since=started))
        assert 2 <= sent <= 10 * settled + 2, (type(part).__name__, sent, settled)
    assert published > 50 * burst, published  # the burst really outran the throttle
    panel.close()


def test_a_saved_trace_replays_with_the_step_slider(engine, front_end, tmp_path):
    path = tmp_path / "trace.jsonl"
    recorder, recorded = TraceRecorder(path), []
    engine.subscribe(lambda event: (recorder(event), recorded.append(event)), pages=True)
    engine.generate(["replay me " * 4, "and me too " * 3], SamplingParams(max_tokens=8, temperature=0.0))
    wait_for(lambda: len(recorded) == engine.stats()["steps"])
    recorder.close()
    engine.close()  # the trace is all a replay needs
    events = load_trace(path)
    assert [e.kv_holders for e in events] == [e.kv_holders for e in recorded] and any(e.kv_holders for e in events)
    old = tmp_path / "old.jsonl"  # a trace recorded before kv_holders existed still loads
    old.write_text("".join(json.dumps({k: v for k, v in e.to_dict().items() if k != "kv_holders"}) + "\n"
                           for e in events))
    assert [e.kv_holders for e in load_trace(old)] == [None] * len(events)
    panel = Dashboard(str(path))
    kv, decisions = panel.parts[1].view, panel.parts[3].view
    assert events[0].page_owner is not None and events[-1].page_owner is not None
    for k in (3, len(events)):
        panel.slider.value = k
        owners, meta = front_end.grid(kv)
        # The newest map up to step k: a reader gets one at most PAGE_MAPS_PER_SECOND (and the last step's).
        mapped = [e for e in events[:k] if e.page_owner is not None][-1]
        assert meta["step"] == mapped.step
        assert np.array_equal(owners, expected_cells(mapped.page_owner))
        assert [d["reason"] for d in front_end.items(decisions)] == [d.reason for e in events[:k] for d in e.decisions]
    panel.close()
    without_pages = KVCachePanel([replace(e, page_owner=None) for e in events])
    said = front_end.custom(without_pages.parts[0].view)[-1][0]
    assert said["cells"] == 0 and "pages=True" in said["info"]
    without_pages.close()


def test_closing_a_panel_stops_its_thread_and_its_messages(engine, front_end):
    panel = KVCachePanel(engine)
    engine.generate(["before closing"], SamplingParams(max_tokens=4))
    wait_for(lambda: front_end.custom(panel.parts[0].view))
    panel.close()
    assert not panel.running
    count = len(front_end.sent)
    engine.generate(["after closing"], SamplingParams(max_tokens=4))
    time.sleep(0.3)
    assert len(front_end.sent) == count


def test_a_million_slot_pool_is_aggregated_and_patched_by_change():
    rng = np.random.default_rng(0)
    pages = np.full(1_000_000, -1, dtype=np.int32)
    pages[: 600_000] = rng.integers(0, 256, 600_000)
    pages[600_000: 650_000] = -2
    pages[650_000: 660_000] = -3
    grid = KVGrid(max_cells=4096)
    started = time.perf_counter()
    grid.update(pages)
    first = grid.patch()
    took = time.perf_counter() - started
    assert first.full and len(first.indices) == len(grid.owners) <= 4096
    per = grid.pages_per_cell
    for cell in rng.integers(0, len(grid.owners), 50):
        block = pages[cell * per: (cell + 1) * per]
        codes = [PAGE_TO_CELL.get(int(o), int(o)) for o in block]
        assert grid.owners[cell] == max(codes)
        assert grid.fills[cell] == int(np.sum(block != -1) * 255 // per)
    pages[2000 * per: 2003 * per] = 7  # a request grows by three whole cells
    grid.update(pages)
    second = grid.patch()
    assert not second.full and len(second.indices) == 3
    assert took < 2.0, f"aggregating a million slots took {took:.2f}s"


def grid_page_by_page(pages, max_cells):
    """What KVGrid must show, computed one page at a time: cells, fills, row pages, figures."""
    per = -(-len(pages) // max_cells)
    owners, fills = [], []
    for start in range(0, len(pages), per):
        block = [int(o) for o in pages[start: start + per]]
        owners.append(max(PAGE_TO_CELL.get(o, o) for o in block))
        fills.append((len(block) - block.count(-1)) * 255 // len(block))
    rows, longest, run, free = {}, 0, 0, 0
    for o in pages.tolist():
        run = run + 1 if o == -1 else 0
        longest, free = max(longest, run), free + (o == -1)
        if o >= 0:
            rows[o] = rows.get(o, 0) + 1
    return owners, fills, rows, 1 - free / len(pages), 0.0 if not free else 1 - longest / free


def test_kv_grid_updates_by_changed_cells_equal_a_page_by_page_count():
    """The grid recomputes only the cells whose pages changed and keeps its figures from per-cell
    summaries: after every update (one page, a few, most of the pool; the caller's own array changed
    in place) it equals the pool counted page by page, and an update with nothing changed does nothing."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        pages = rng.choice([-3, -2, -1, -1, -1, 0, 1, 2, 7], int(rng.integers(1, 900))).astype(np.int32)
        max_cells = int(rng.integers(1, 40))
        grid, drawn = KVGrid(max_cells), None
        for change in range(6):
            assert grid.update(pages) == (drawn is None or not np.array_equal(drawn, pages))
            drawn = pages.copy()
            owners, fills, rows, utilization, fragmentation = grid_page_by_page(pages, max_cells)
            assert grid.owners.tolist() == owners and grid.fills.tolist() == fills, (trial, change)
            assert grid.row_pages == rows and grid.utilization == pytest.approx(utilization)
            assert grid.fragmentation == pytest.approx(fragmentation), (trial, change)
            grid.patch()
            assert not grid.update(pages.copy()) and len(grid.patch().indices) == 0
            moved = rng.integers(0, len(pages), int(rng.integers(1, 4)) if change % 3 else len(pages))
            if change == 4:
                moved = [len(pages) - 1]  # the last cell alone, short when the cells do not divide the pool
            pages[moved] = rng.choice([-3, -2, -1, 0, 4, 9], len(moved))


def test_the_kv_grid_names_the_viewer_s_requests_and_keeps_others_anonymous(engine, front_end):
    """Alice's panel through her redacted subscription: at every step it drew, its hover/legend data
    names exactly her requests holding pages, and bob's only as "other" rows with token counts."""
    rng = random.Random(0)
    loop = engine.driver()
    operator = loop.subscribe(pages=True, maxsize=10_000)
    panel = KVCachePanel(engine.client(user="alice"), rate=50.0)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    handles = [loop.submit([rng.randrange(3, 49152) for _ in range(12)], params, user=user)
               for user in ("bob-the-secret", "alice") * 3]
    assert all(h.result(60).finish_reason == "length" for h in handles)
    ids = {user: {h.request_id for h in handles if h.user == user} for user in ("alice", "bob-the-secret")}
    steps = loop.stats()["steps"]
    view = panel.parts[0].view
    wait_for(lambda: (front_end.grid(view)[1] or {}).get("step") == steps)
    shown = [content for content, _ in front_end.custom(view) if content.get("cells")]
    panel.close()
    operator.close()
    full = {e.step: e for e in operator}
    both = 0
    for content in shown:
        event = full[content["step"]]
        # The operator's map, where its step brought one (at most PAGE_MAPS_PER_SECOND); else the panel's counts.
        pages = None if event.page_owner is None else np.bincount(event.page_owner[event.page_owner >= 0])
        expected = {}
        for h in event.kv_holders:
            held = content["rows"].get(str(h.row), {}).get("pages", 0) if pages is None else \
                (int(pages[h.row]) if h.row < len(pages) else 0)
            if held:
                mine = h.user == "alice"
                expected[str(h.row)] = {"pages": held, "who": "mine" if mine else "other",
                                        "request": h.request_id if mine else None, "tokens": h.tokens}
        assert content["rows"] == expected
        named = {v["request"] for v in content["rows"].values() if v["who"] == "mine"}
        assert named <= ids["alice"]
        both += bool(named) and any(v["who"] == "other" for v in content["rows"].values())
        text = json.dumps(content)
        assert "bob" not in text and "secret" not in text and "other-" not in text
        assert not any(rid in text for rid in ids["bob-the-secret"])
    assert len(shown) >= 2 and both, (len(shown), both)


def test_a_pump_behind_its_events_drops_the_oldest_and_a_stopped_pump_draws_nothing_still_queued():
    consumed, renders = [], []
    busy, go_on = threading.Event(), threading.Event()

    def consume(event):
        busy.set()
        go_on.wait(30)
        consumed.append(event)

    pump = Pump(consume, lambda: renders.append(list(consumed)), rate=1000, backlog=4)
    pump.push(0)
    assert busy.wait(30)  # the pump holds event 0 and is stuck in consume
    for i in range(1, 11):
        pump.push(i)  # ten more than a backlog of 4 holds
    assert pump.dropped == 6
    go_on.set()
    wait_for(lambda: renders and renders[-1] == [0, 7, 8, 9, 10])  # the newest four survive

    busy.clear()
    go_on.clear()
    pump.push("being consumed")
    assert busy.wait(30)
    pump.push("still queued")
    pump.stop(timeout=0)
    go_on.set()
    wait_for(lambda: not pump.running)
    assert consumed[-1] == "being consumed"


def say_hello(view):
    """What the browser's view sends when it opens, delivered as the kernel delivers comm messages."""
    view.comm.handle_msg({"content": {"data": {"method": "custom", "content": {"kind": "hello"}}}, "buffers": []})


def test_views_not_heard_from_get_their_whole_state_again_every_second_and_heard_ones_only_changes(engine, front_end):
    """A view that opens while its `%%lightllm --panel` cell still generates cannot be answered (its
    hello waits for the busy kernel); it must still draw the grid within about a second."""
    events = []
    engine.subscribe(events.append, pages=True)
    engine.generate([f"late view {i} " * 3 for i in range(4)], SamplingParams(max_tokens=6, temperature=0.0))
    wait_for(lambda: len(events) == engine.stats()["steps"])
    events = [event for event in events if event.page_owner is not None]
    hub = EventHub()
    panel = Dashboard(hub, rate=20.0)
    trends, kv, batch, decisions = (part.view for part in panel.parts)
    published = 0

    def publish_for(seconds):
        nonlocal published
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            event = events[published % len(events)]
            hub.publish(replace(event, step=published + 1), lambda: event.page_owner)
            published += 1
            time.sleep(0.02)

    def full_frames(view, since):
        return sum(1 for content, _ in front_end.custom(view, since) if content.get("full"))

    def resets(view, since):
        return sum(1 for content, _ in front_end.custom(view, since) if content.get("reset"))

    start = time.monotonic()
    publish_for(2.6)
    assert full_frames(kv, start) >= 3 and resets(batch, start) >= 3, (full_frames(kv, start), resets(batch, start))
    wait_for(lambda: (front_end.grid(kv)[1] or {}).get("step") == published)
    assert np.array_equal(front_end.grid(kv)[0], expected_cells(events[(published - 1) % len(events)].page_owner))
    say_hello(kv)
    heard = time.monotonic()
    publish_for(2.6)
    assert full_frames(kv, heard) == 1               # the answer to its hello; then only changes
    assert len(front_end.custom(kv, heard)) > 10     # which kept coming
    assert resets(batch, heard) >= 2                 # the views not heard from still get keyframes
    panel.close()
