"""No KV slot is ever lost: random requests, random aborts, tight memory, every policy."""

from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

from lightllm_nb import Engine, SamplingParams

request_st = st.tuples(
    st.integers(1, 40),                        # prompt length
    st.integers(1, 20),                        # max_tokens
    st.one_of(st.none(), st.integers(0, 12)),  # abort after this many steps, or never
)


@pytest.fixture(scope="module", params=[(1, "aggressive", False), (4, "conservative", False), (16, "aggressive", False),
                        (1, "aggressive", True)],
                ids=lambda p: f"page{p[0]}-{p[1]}" + ("-overlap" if p[2] else ""))
def engine(request, tiny_model):
    page_size, policy, overlap = request.param
    folder, _ = tiny_model("qwen2")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=128, page_size=page_size, overlap=overlap,
                scheduler=policy, max_running=6, max_batch_tokens=24) as eng:
        yield eng


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(request_st, min_size=1, max_size=10), seed=st.integers(0, 2**16))
def test_random_requests_and_aborts_leave_the_pool_whole(engine, requests, seed):
    ids = []
    for prompt_len, max_tokens, abort_at in requests:
        prompt = [(seed + 7 * i) % 49000 + 3 for i in range(prompt_len)]
        rid = engine.add_request(prompt_token_ids=prompt, sampling=SamplingParams(
            max_tokens=max_tokens, temperature=0.8, seed=seed, ignore_eos=True))
        ids.append((rid, abort_at))
    finished = {}   # request id -> (its Completion, the step it finished in)
    step = 0
    while engine.has_unfinished():
        for rid, abort_at in ids:
            if abort_at == step:
                engine.abort(rid)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished, "a request finished twice"
                finished[out.request_id] = (out.completion, step)
        step += 1
        assert step < 2000, "the engine stopped making progress"
    assert set(finished) == {rid for rid, _ in ids}
    for (rid, abort_at), (_, max_tokens, _) in zip(ids, requests):
        done, finished_at = finished[rid]
        # With ignore_eos nothing stops a request but its length or an abort that came first.
        if abort_at is not None and abort_at <= finished_at:
            assert (done.finish_reason, finished_at) == ("abort", abort_at)
            assert len(done.token_ids) < max_tokens
        else:
            assert done.finish_reason == "length"
            assert len(done.token_ids) == max_tokens
    engine.clear_prefix_cache()
    assert engine.pool.is_whole()
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


def test_pages_come_out_last_freed_first_and_zero_pages_take_none():
    """alloc_pages hands out the most recently freed pages first (what a stack of pops gives), and
    asking for none (or fewer) takes none."""
    import torch

    from lightllm_nb.kv.kv_pool import KVPool

    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=4, num_tokens=16, page_size=1, max_requests=2,
                  max_context=16, dtype=torch.float32, device=torch.device("cpu"))
    free = pool.num_free_pages
    assert pool.alloc_pages(0, owner=0) == [] and pool.alloc_pages(-3, owner=0) == [] and pool.num_free_pages == free
    first = pool.alloc_pages(3, owner=0)
    assert len(set(first)) == 3 and pool.num_free_pages == free - 3
    pool.free_pages(first)
    assert pool.alloc_pages(3, owner=1) == first[::-1]
    assert pool.is_whole() is False
