"""The driver loop on its own: faults, idleness, slow subscribers, waiting limits, shutdown, and
who may abort what."""

import os
import signal
import threading
import time

import pytest

from lightllm_nb import DriverLoop, Engine, InvalidRequestError, SamplingParams
from lightllm_nb.engine import detokenizer

GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)


@pytest.fixture
def engine(tiny_model):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=256, max_running=8) as eng:
        yield eng


def test_a_failing_step_finishes_its_batch_with_error_and_the_loop_serves_on(engine, monkeypatch):
    run = engine.runner.run
    calls = []

    def fails_once(items):
        calls.append(len(items))
        if len(calls) == 2:  # the second step: both requests are decoding
            raise RuntimeError("injected fault")
        return run(items)

    monkeypatch.setattr(engine.runner, "run", fails_once)
    client = engine.client()
    failed = client.generate(prompt_token_ids=[[5, 6, 7], [8, 9]], sampling=GREEDY)
    assert [c.finish_reason for c in failed] == ["error", "error"]
    assert all("RuntimeError: injected fault" in c.error for c in failed)
    assert [len(c.token_ids) for c in failed] == [1, 1]  # the token of the step before the fault
    engine.clear_prefix_cache()
    assert engine.pool.is_whole() and engine.stats()["running"] == 0
    again = client.generate(prompt_token_ids=[[5, 6, 7]], sampling=GREEDY)[0]
    assert again.finish_reason == "length" and len(again.token_ids) == 5 and again.error is None


def test_a_loop_that_cannot_take_the_engine_says_why_instead_of_hanging(engine, monkeypatch):
    # As on a GPU named plain "cuda", where setting the loop thread's device once raised.
    own = engine._own

    def refuses(thread_id):
        if thread_id is not None:
            raise ValueError("no such device")
        own(thread_id)

    monkeypatch.setattr(engine, "_own", refuses)
    with pytest.raises(RuntimeError, match="could not take over the engine: no such device"):
        engine.generate(prompt_token_ids=[[5, 6, 7]], sampling=GREEDY)
    monkeypatch.setattr(engine, "_own", own)
    assert engine.generate(prompt_token_ids=[[5, 6, 7]], sampling=GREEDY)[0].finish_reason == "length"


def test_an_idle_loop_sleeps_and_publishes_nothing(engine):
    loop = engine.driver()
    events = loop.subscribe(maxsize=1000)
    engine.generate(prompt_token_ids=[[5, 6, 7]], sampling=GREEDY)
    steps = engine.stats()["steps"]
    seen = []
    while True:
        try:
            seen.append(events.get(timeout=0.5))
        except TimeoutError:
            break
    assert seen and seen[-1].step == steps
    time.sleep(0.3)
    assert engine.stats()["steps"] == steps, "the loop stepped with nothing to do"
    with pytest.raises(TimeoutError):
        events.get(timeout=0.2)
    events.close()


def test_a_slow_subscriber_loses_the_oldest_events_and_is_told(engine):
    loop = engine.driver()
    slow = loop.subscribe(maxsize=2)
    engine.generate(prompt_token_ids=[[5, 6, 7], [8, 9]], sampling=SamplingParams(max_tokens=10, temperature=0,
                                                                                   ignore_eos=True))
    steps = engine.stats()["steps"]
    slow.close()
    kept = list(slow)
    assert [e.step for e in kept] == [steps - 1, steps]
    assert slow.dropped == steps - 2


def test_waiting_limits_say_what_to_do(engine):
    loop = DriverLoop(engine, max_waiting=3, max_waiting_per_user=2)
    busy = loop.call(lambda: time.sleep(0.5))  # hold the loop: nothing starts meanwhile
    alice = [loop.submit([5, 6, 7], GREEDY, user="alice") for _ in range(2)]
    with pytest.raises(InvalidRequestError, match="you have 2 requests waiting to start and max_waiting_per_user=2"):
        loop.submit([5, 6, 7], GREEDY, user="alice")
    bob = loop.submit([8, 9], GREEDY, user="bob")
    with pytest.raises(InvalidRequestError, match="the engine has 3 requests waiting to start and max_waiting=3"):
        loop.submit([8, 9], GREEDY, user="carol")
    busy.result(5)
    assert [h.result(30).finish_reason for h in alice + [bob]] == ["length"] * 3
    assert loop.submit([5, 6], GREEDY, user="alice").result(30).finish_reason == "length"  # room again
    with pytest.raises(RuntimeError, match="already has a driver loop"):
        DriverLoop(engine)


def test_abort_is_owner_checked_and_ids_cannot_be_probed(engine):
    alice, bob = engine.client(user="alice"), engine.client(user="bob")
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    stream = bob.stream(prompt_token_ids=[5, 6, 7], sampling=long)
    assert len(stream.request_id) >= 20
    assert alice.abort(stream.request_id) is False
    assert alice.abort("no-such-request") is False
    assert "".join(stream) and stream.completion.finish_reason == "length"
    assert len(stream.completion.token_ids) == 40
    mine = alice.stream(prompt_token_ids=[5, 6, 7], sampling=long)
    deltas = iter(mine)  # held: an iterator dropped before the end aborts its request
    next(deltas)
    assert alice.abort(mine.request_id) is True
    assert list(mine) is not None and mine.completion.finish_reason == "abort"


def test_leaving_a_stream_early_aborts_it(engine):
    client = engine.client()
    for delta in client.stream(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=200, temperature=0,
                                                                                     ignore_eos=True)):
        break
    deadline = time.monotonic() + 10
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


def test_shutdown_aborts_everything_frees_all_and_a_new_loop_can_start(engine):
    loop = engine.driver()
    handles = [loop.submit([5, 6, 7 + i], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True),
                           user="alice") for i in range(4)]
    next(iter(handles[0]))  # running now
    loop.shutdown()
    assert not loop.running
    assert [h.result(1).finish_reason for h in handles] == ["abort"] * 4
    assert engine.pool.is_whole(), "shutdown frees everything, the prefix cache too"
    with pytest.raises(RuntimeError, match="shut down"):
        loop.submit([5], GREEDY, user="alice")
    assert engine.generate(prompt_token_ids=[[5, 6]], sampling=GREEDY)[0].finish_reason == "length"


def test_threads_and_the_low_level_api(engine):
    """Once the loop runs, only its thread may drive the engine; the error says what to use."""
    engine.generate(prompt_token_ids=[[5, 6]], sampling=GREEDY)
    errors = []

    def poke():
        try:
            engine.step()
        except RuntimeError as err:
            errors.append(str(err))

    t = threading.Thread(target=poke)
    t.start()
    t.join()
    assert errors and "engine.client(user=...)" in errors[0]


def test_an_interrupted_generate_aborts_its_requests(engine, monkeypatch):
    """Ctrl-C (a notebook's interrupt) during generate stops its requests and frees their KV."""
    run = engine.runner.run

    def slow_run(*args, **kwargs):  # 200 steps of the tiny model could end before the interrupt lands
        time.sleep(0.005)
        return run(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "run", slow_run)

    def interrupt_once_running():
        deadline = time.monotonic() + 30
        while engine.stats()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)  # what a notebook's interrupt button sends

    events = engine.driver().subscribe(maxsize=10_000)
    threading.Thread(target=interrupt_once_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        engine.generate(prompt_token_ids=[[5, 6, 7], [8, 9]],
                        sampling=SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    deadline = time.monotonic() + 10
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
    events.close()
    assert [d.code for e in events for d in e.decisions if d.kind == "finish"] == ["abort", "abort"]
    engine.clear_prefix_cache()
    assert engine.pool.is_whole()


def test_an_engine_nobody_references_is_collected_and_its_loop_ends(tiny_model):
    """A notebook cell run twice (`engine = Engine(...)`) must not keep the first engine's memory."""
    import gc
    import weakref

    folder, _ = tiny_model("llama")
    engine = Engine(str(folder), device="cpu", progress=False, kv_tokens=64)
    assert engine.generate(prompt_token_ids=[[5, 6]], sampling=GREEDY)[0].finish_reason == "length"
    thread = engine.driver()._thread
    gone = weakref.ref(engine)
    del engine
    gc.collect()
    thread.join(10)
    assert gone() is None and not thread.is_alive()


def test_streamed_text_is_decoded_by_the_reader_not_the_step_thread(engine, monkeypatch):
    on_step_thread = []

    def note() -> None:
        if threading.current_thread().name == "lightllm-driver":
            on_step_thread.append(1)
    decode = engine.tokenizer.decode
    monkeypatch.setattr(engine.tokenizer, "decode", lambda *a, **k: note() or decode(*a, **k))
    # Incremental decoders may call the tokenizer's Rust backend directly (detokenizer.text_decoder).
    make_decoder = detokenizer.text_decoder
    monkeypatch.setattr(detokenizer, "text_decoder",
                        lambda tokenizer: (lambda inner: lambda ids: note() or inner(ids))(make_decoder(tokenizer)))
    sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    stream = engine.stream(prompt_token_ids=[5, 6, 7], sampling=sampling)
    deltas = list(stream)
    assert len(deltas) >= 4 and "".join(deltas) == stream.completion.text
    assert len(on_step_thread) == 1  # the Completion's text, once at the end
    # Stop strings are the engine's to watch: it decodes those requests itself.
    text = "".join(engine.stream(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True, stop=[deltas[3].strip() or "\n"])))
    assert len(on_step_thread) > 2 and len(text) <= len(stream.completion.text)


def test_the_step_thread_carries_its_name_in_the_os(engine):  # Linux, where the tests run
    """So that top -H, py-spy and bench/serving.py's CPU by thread tell it from the others."""
    loop = engine.driver()
    assert open(f"/proc/self/task/{loop._thread.native_id}/comm").read().strip() == "lightllm-driver"
