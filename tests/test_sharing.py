"""One engine, many callers in one process: nobody's results are lost, whoever runs the steps."""

import pytest

from lightllm_nb import Engine, InvalidRequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=512) as eng:
        yield eng


def test_the_driver_loop_owns_the_engine_once_it_runs(tiny_model):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=128) as engine:
        mine = engine.add_request(prompt_token_ids=[5, 6, 7], sampling=GREEDY)  # no loop yet: this thread drives
        engine.step()
        assert engine.abort(mine)
        engine.step()
        assert not engine.has_unfinished()
        assert len(engine.generate(prompt_token_ids=[[8, 9, 10]], sampling=GREEDY)[0].token_ids) == 6
        for call in (lambda: engine.add_request(prompt_token_ids=[3, 4]), engine.step, lambda: engine.abort("x")):
            with pytest.raises(RuntimeError, match="Use the thread-safe client"):
                call()
        assert engine.clear_prefix_cache() >= 0 and engine.stats()["running"] == 0  # forwarded to the loop


def test_two_streams_read_in_lockstep(engine):
    alone = ["".join(engine.stream(prompt_token_ids=p, sampling=GREEDY)) for p in ([11, 12], [13, 14, 15])]
    a = engine.stream(prompt_token_ids=[11, 12], sampling=GREEDY)
    b = engine.stream(prompt_token_ids=[13, 14, 15], sampling=GREEDY)
    together = ["", ""]
    for da, db in zip(a, b):
        together[0] += da
        together[1] += db
    together[0] += "".join(a)
    together[1] += "".join(b)
    assert together == alone
    assert not engine.has_unfinished()


def test_user_chosen_ids_do_not_collide_with_automatic_ones(tiny_model):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=128) as engine:
        taken = engine.add_request(prompt_token_ids=[3, 4], sampling=GREEDY, request_id="req-1")
        others = [engine.add_request(prompt_token_ids=[5, 6], sampling=GREEDY) for _ in range(3)]
        assert taken not in others and len(set(others)) == 3
        with pytest.raises(InvalidRequestError, match="request_id='req-1' is already in use"):
            engine.add_request(prompt_token_ids=[3, 4], request_id="req-1")
        with pytest.raises(InvalidRequestError, match="priority='high' is invalid"):
            engine.add_request(prompt_token_ids=[3, 4], priority="high")
        with pytest.raises(InvalidRequestError, match="user='' is invalid"):
            engine.add_request(prompt_token_ids=[3, 4], user="")
        while engine.has_unfinished():
            engine.step()


def test_client_ids_are_unguessable_and_bad_identity_is_refused(engine):
    results = engine.generate(prompt_token_ids=[[5, 6]] * 3, sampling=GREEDY)
    ids = {r.request_id for r in results}
    assert len(ids) == 3 and all(len(rid) >= 20 and not rid.startswith("req-") for rid in ids)
    with pytest.raises(InvalidRequestError, match="priority='high' is invalid"):
        engine.generate(prompt_token_ids=[[3, 4]], priority="high")
    with pytest.raises(InvalidRequestError, match="user='' is invalid"):
        engine.client(user="")


def test_a_failing_subscriber_loses_nothing(engine):
    def broken(event):
        raise ValueError("panel bug")

    engine.subscribe(broken)
    with pytest.warns(UserWarning, match="panel bug"):
        result = engine.generate(prompt_token_ids=[[7, 8, 9]], sampling=GREEDY)[0]
    assert len(result.token_ids) == 6


def test_pages_round_the_context_limit_down(tiny_model):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=100, page_size=16) as eng:
        assert eng.pool.capacity == 96 and eng.pool.max_context == 96
        with pytest.raises(InvalidRequestError, match="context limit of 96 tokens"):
            eng.add_request(prompt_token_ids=[5] * 10, sampling=SamplingParams(max_tokens=90))
