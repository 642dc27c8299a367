"""The sampler against hand computations, exact supports and seeded reproducibility.

Statistical tests use fixed seeds and tolerances of many standard deviations, so they neither
flake nor depend on one RNG stream.
"""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightllm_nb.engine.sampler import RequestSampler, Sampler, _top_k_top_p_mask, inverse_cdf
from lightllm_nb.sampling_params import SamplingParams

CPU = torch.device("cpu")


def requests_for(*params, prompt=()):
    return [RequestSampler(p, prompt, CPU) for p in params]


def draw_frequencies(probs, params, draws=20_000, seed=0):
    """Frequencies of each token over `draws` unseeded rows sampled in one batch."""
    torch.manual_seed(seed)
    logits = torch.tensor(probs).log().expand(draws, -1).contiguous()
    tokens = Sampler(len(probs), CPU).sample(logits, requests_for(*[params] * draws)).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=len(probs)).double() / draws


def assert_frequencies(observed, expected):
    # Binomial std at 20k draws is at most 0.0036: 0.025 is seven of them.
    torch.testing.assert_close(observed, torch.tensor(expected, dtype=torch.float64), atol=0.025, rtol=0)


def all_logprobs(logits, params, prompt=(), generated=()):
    """The full log-prob row the sampler reports, read back from top_logprobs with N = vocab."""
    vocab = logits.shape[-1]
    request = RequestSampler(SamplingParams(temperature=0, logprobs=vocab, **params), prompt, CPU)
    for token in generated:
        request.observe(token)
    top = Sampler(vocab, CPU).sample(logits[None], [request]).top_logprobs[0]
    values = torch.empty(vocab)
    for token, value in top:
        values[token] = value
    return values


SKEWED = [0.4, 0.3, 0.15, 0.1, 0.05]


def test_greedy_equals_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(50, CPU)
    result = sampler.sample(logits, requests_for(*[SamplingParams(temperature=0)] * 6))
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs == [None] * 6 and result.top_logprobs == [None] * 6
    bf16 = sampler.sample(logits.bfloat16(), requests_for(*[SamplingParams(temperature=0, logprobs=1)] * 6))
    assert bf16.token_ids == logits.bfloat16().argmax(-1).tolist()
    best = logits.bfloat16().float().log_softmax(-1).max(-1).values.tolist()
    assert bf16.logprobs == pytest.approx(best), "greedy rows that ask for logprobs get them"
    assert bf16.top_logprobs == [[(t, pytest.approx(v))] for t, v in zip(bf16.token_ids, best)]


@pytest.mark.parametrize("temperature", [1e-6, 1e-38, 1e-45, 5e-324])
def test_temperatures_too_small_to_divide_by_are_greedy(temperature):
    logits = 5 * torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    assert Sampler(50, CPU).sample(logits, requests_for(*[params] * 64)).token_ids == logits.argmax(-1).tolist()


def test_greedy_applies_penalties_first():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    request = RequestSampler(SamplingParams(temperature=0, repetition_penalty=1.5), [0], CPU)
    assert Sampler(3, CPU).sample(logits, [request]).token_ids == [1]


def test_temperature_reshapes_the_distribution():
    expected = torch.tensor(SKEWED).pow(1 / 2.0)
    assert_frequencies(draw_frequencies(SKEWED, SamplingParams(temperature=2.0)),
                       (expected / expected.sum()).tolist())
    assert_frequencies(draw_frequencies(SKEWED, SamplingParams(temperature=1.0)), SKEWED)


@pytest.mark.parametrize("params, support", [
    (SamplingParams(top_k=2), [0, 1]),
    (SamplingParams(top_k=1), [0]),
    (SamplingParams(top_p=0.6), [0, 1]),         # 0.4 < 0.6 <= 0.7
    (SamplingParams(top_p=0.75), [0, 1, 2]),     # 0.7 < 0.75 <= 0.85
    # top-p applies to what top-k left: [0.4, 0.3, 0.15] / 0.85 reaches 0.8 after two tokens,
    # where the untruncated distribution would need three.
    (SamplingParams(top_k=3, top_p=0.8), [0, 1]),
    # Temperature comes first: at 0.5, [.59, .33, .08] reaches 0.55 with one token.
    (SamplingParams(top_k=3, top_p=0.55, temperature=0.5), [0]),
])
def test_top_k_top_p_keep_exactly_their_support(params, support):
    observed = draw_frequencies(SKEWED, params)
    scaled = torch.tensor(SKEWED).pow(1 / params.temperature)
    expected = torch.zeros(len(SKEWED))
    expected[support] = scaled[support] / scaled[support].sum()
    assert (observed > 0).nonzero().flatten().tolist() == support
    assert_frequencies(observed, expected.tolist())


@pytest.mark.gpu
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=2.0), SamplingParams(top_k=2),
                                    SamplingParams(top_k=3, top_p=0.55, temperature=0.5), SamplingParams(seed=3)])
def test_cuda_rows_draw_from_their_tempered_truncated_distribution_beside_greedy_rows(params):
    """On the GPU untruncated rows race in the fused kernel and truncating ones take the torch path;
    half the rows here are greedy (they take token 0, the argmax)."""
    device, rows = torch.device("cuda"), 40_000
    logits = torch.tensor(SKEWED).log().expand(rows, -1).contiguous().to(device)
    requests = [RequestSampler(p, [], device) for p in [params, SamplingParams(temperature=0)] * (rows // 2)]
    sampler = Sampler(len(SKEWED), device, torch.Generator(device=device).manual_seed(0))
    tokens = torch.tensor(sampler.sample_on_device(logits, requests).tolist())
    assert set(tokens[1::2].tolist()) == {0}
    scaled = torch.tensor(SKEWED).log() / params.temperature
    keep = _top_k_top_p_mask(scaled[None], torch.tensor([[params.top_k or len(SKEWED)]]),
                             torch.tensor([[params.top_p]]))
    expected = scaled.softmax(-1) * keep[0]
    observed = torch.bincount(tokens[::2], minlength=len(SKEWED)).double() / (rows // 2)
    if params.seed is not None:  # every row is the same request's first draw: one token, always
        assert (observed == 1).sum() == 1
        return
    assert_frequencies(observed, (expected / expected.sum()).tolist())


def test_top_p_keeps_tokens_tied_with_the_last_one():
    # The smallest set reaching 0.5 is {0, 1} or {0, 2}: both ties stay, the 0.1s go.
    observed = draw_frequencies([0.4, 0.2, 0.2, 0.1, 0.1], SamplingParams(top_p=0.5))
    assert_frequencies(observed, [0.5, 0.25, 0.25, 0.0, 0.0])
    assert observed[3] == observed[4] == 0


def test_top_p_stops_at_the_token_whose_mass_reaches_it_and_one_keeps_a_tail_rounding_hides():
    halves = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()  # exact in float32: 0.5 reaches 0.5
    kept = _top_k_top_p_mask(halves, torch.tensor([[4]]), torch.tensor([[0.5]]))
    assert kept.tolist() == [[True, False, False, False]]
    tail = torch.tensor([[0.0, -30.0, -30.0]])  # the running sum is 1.0 before the tail in float32
    assert _top_k_top_p_mask(tail, torch.tensor([[3]]), torch.tensor([[1.0]])).all()


def test_a_truncating_row_keeps_its_support_beside_rows_that_do_not_truncate():
    logits = torch.tensor(SKEWED).log().expand(400, -1).contiguous()
    params = [SamplingParams(top_k=1), SamplingParams()] * 200
    torch.manual_seed(0)
    tokens = Sampler(len(SKEWED), CPU).sample(logits, requests_for(*params)).token_ids
    assert set(tokens[::2]) == {0}, "top_k=1 rows drew outside their support"
    assert len(set(tokens[1::2])) > 1


def test_greedy_rows_beside_sampled_ones_take_the_argmax():
    # Nearly flat: a draw is rarely the argmax.
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(6)) * 0.01
    params = [SamplingParams(temperature=0)] * 4 + [SamplingParams(seed=4)]
    tokens = Sampler(30, CPU).sample(logits, requests_for(*params)).token_ids
    assert tokens[:4] == logits[:4].argmax(-1).tolist()


def test_unseeded_rows_draw_from_the_samplers_generator_not_torchs_global_one():
    logits = torch.zeros(4, 1000)
    params = [SamplingParams(), SamplingParams(temperature=0, seed=5), SamplingParams(), SamplingParams(seed=2)]
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        sampler = Sampler(1000, CPU, torch.Generator().manual_seed(0))
        runs.append(sampler.sample(logits, requests_for(*params)).token_ids)
    assert runs[0] == runs[1]


def test_top_k_keeps_tokens_tied_with_the_kth():
    observed = draw_frequencies([0.4, 0.2, 0.2, 0.2], SamplingParams(top_k=2))
    assert_frequencies(observed, [0.4, 0.2, 0.2, 0.2])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), vocab=st.integers(1, 300), top_k=st.integers(0, 40),
       top_p=st.floats(0.01, 1.0), temperature=st.floats(0.05, 3.0), spread=st.floats(0.1, 8.0))
def test_drawn_token_is_always_inside_the_top_k_top_p_support(seed, vocab, top_k, top_p, temperature, spread):
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(seed)) * spread
    logits[:, : vocab // 3] = logits[:, :1]  # ties, to exercise the cuts through them
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    torch.manual_seed(seed)
    tokens = Sampler(vocab, CPU).sample(logits, requests_for(*[params] * 8)).token_ids
    for row, token in zip(logits.double() / temperature, tokens):
        # top-k: fewer than k tokens are strictly more likely than the chosen one.
        assert top_k == 0 or int((row > row[token]).sum()) < top_k
        probs = row.masked_fill(row < row.topk(min(top_k, vocab) or vocab).values[-1], -math.inf).softmax(-1)
        # top-p: the tokens strictly more likely than the chosen one don't yet reach top_p.
        assert float(probs[probs > probs[token]].sum()) < top_p + 1e-5


def test_repetition_penalty_on_positive_and_negative_logits():
    logits = torch.tensor([2.0, -1.0, 3.0, -0.5, 1.0, 0.0, -2.0, 0.5, 0.75])
    prompt, generated = [1, 2, 2, 8], [3, 5, 3]
    expected = logits.clone()
    for token in {1, 2, 3, 5, 8}:  # each seen token once, however often it occurs
        expected[token] = logits[token] / 1.3 if logits[token] > 0 else logits[token] * 1.3
    observed = all_logprobs(logits, dict(repetition_penalty=1.3), prompt, generated)
    torch.testing.assert_close(observed, expected.log_softmax(-1))


def test_presence_and_frequency_count_only_generated_tokens():
    logits = torch.tensor([2.0, -1.0, 3.0, -0.5, 1.0, 0.0])
    generated = [2] * 20 + [4]  # more than the history's first buffer holds
    expected = logits.clone()
    expected[2] -= 0.5 + 0.25 * 20
    expected[4] -= 0.5 + 0.25 * 1
    observed = all_logprobs(logits, dict(presence_penalty=0.5, frequency_penalty=0.25),
                            prompt=[0, 1], generated=generated)
    torch.testing.assert_close(observed, expected.log_softmax(-1))


def test_a_penalty_history_grows_only_when_full():
    """Its memory follows the output (doubling when full), so a long output never holds more than
    twice its ids, and every id observed is kept in order."""
    request = RequestSampler(SamplingParams(frequency_penalty=1.0), [], CPU)
    for token in range(40):
        request.observe(token)
        slots, kept = len(request.history._generated), request.history.num_generated
        assert slots <= max(16, 2 * kept), f"{slots} slots for {kept} ids"
    assert request.history.generated_ids.tolist() == list(range(40))


def test_repetition_comes_before_presence_and_frequency():
    logits = torch.tensor([2.0, -1.0, 3.0, 1.0])
    expected = torch.tensor([2.0 / 2, -1.0 * 2, 3.0 / 2 - 1.0 - 0.5 * 2, 1.0])
    observed = all_logprobs(logits, dict(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5),
                            prompt=[0, 1], generated=[2, 2])
    torch.testing.assert_close(observed, expected.log_softmax(-1))


def test_penalties_touch_only_their_rows_and_not_the_callers_logits():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    original = logits.clone()
    requests = requests_for(SamplingParams(temperature=0, logprobs=10),
                            SamplingParams(temperature=0, logprobs=10, frequency_penalty=2.0),
                            SamplingParams(temperature=0, logprobs=10), prompt=[0, 1, 2])
    requests[1].observe(7)
    penalized = logits.clone()
    penalized[1, 7] -= 2.0
    result = Sampler(10, CPU).sample(logits, requests)
    assert torch.equal(logits, original)
    for row in range(3):
        top = dict(result.top_logprobs[row])
        torch.testing.assert_close(torch.tensor([top[t] for t in range(10)]), penalized[row].log_softmax(-1))


def run_seeded(params, device, crowded, steps=12, vocab=64):
    """Tokens a seeded request draws alone, or among other requests at a row that moves."""
    logits = (torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 0.3).to(device)
    target = RequestSampler(params, [1, 2], device)
    sampler = Sampler(vocab, device)
    tokens = []
    for step in range(steps):
        others, row = [], 0
        if crowded:
            torch.manual_seed(1000 + step)  # the global RNG moves differently from the run alone
            neighbours = [SamplingParams(), SamplingParams(seed=7, temperature=0.7), SamplingParams(temperature=0),
                          SamplingParams(top_k=3, logprobs=2), SamplingParams(seed=params.seed, repetition_penalty=1.2)]
            others = [RequestSampler(p, [3], device) for p in neighbours[: 1 + step % 5]]
            row = (3 * step) % (len(others) + 1)
        requests = others[:row] + [target] + others[row:]
        batch_logits = torch.randn(len(requests), vocab, device=device)
        batch_logits[row] = logits
        token = sampler.sample(batch_logits, requests).token_ids[row]
        target.observe(token)
        tokens.append(token)
    return tokens


SEEDED = [SamplingParams(seed=42, top_p=0.95, top_k=50, frequency_penalty=0.3),
          SamplingParams(seed=42)]  # alone it skips top-k/top-p; in some batches others need them


@pytest.mark.parametrize("params", SEEDED)
def test_seeded_request_draws_the_same_tokens_in_any_batch_and_row(params, device=CPU):
    alone = run_seeded(params, device, crowded=False)
    assert run_seeded(params, device, crowded=True) == alone
    other_seed = SamplingParams(**{**params.__dict__, "seed": 43})
    assert run_seeded(other_seed, device, crowded=False) != alone


@pytest.mark.gpu
@pytest.mark.parametrize("params", SEEDED)
def test_seeded_request_on_cuda_draws_the_same_tokens_in_any_batch_and_row(params):
    test_seeded_request_draws_the_same_tokens_in_any_batch_and_row(params, torch.device("cuda"))


@pytest.mark.gpu
def test_a_cuda_step_synchronizes_only_to_return_its_results():
    device = torch.device("cuda")
    mixed = [SamplingParams(temperature=0), SamplingParams(seed=3, top_p=0.9, logprobs=5),
             SamplingParams(top_k=20, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
             SamplingParams(temperature=0, frequency_penalty=1.0, logprobs=0), SamplingParams(temperature=0.7)]
    sampler = Sampler(1000, device)
    logits = torch.randn(len(mixed), 1024, device=device, dtype=torch.bfloat16)
    warm_up = [RequestSampler(p, [1, 2, 3], device) for p in mixed]
    sampler.sample(logits, warm_up)  # first calls allocate pinned and device memory
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            requests = [RequestSampler(p, [1, 2, 3], device) for p in mixed]
            for step in range(3):
                result = sampler.sample(logits, requests)
                for request, token in zip(requests, result.token_ids):
                    request.observe(token)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 3, syncs


def test_requests_with_the_same_seed_in_one_batch_draw_the_same_token():
    logits = torch.zeros(3, 1000)
    requests = requests_for(SamplingParams(seed=9), SamplingParams(), SamplingParams(seed=9))
    tokens = Sampler(1000, CPU).sample(logits, requests).token_ids
    assert tokens[0] == tokens[2]


def test_logprobs_are_log_softmax_before_temperature_with_sorted_top_n():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(3))
    requests = requests_for(SamplingParams(temperature=0.5, top_k=5, logprobs=4),
                            SamplingParams(temperature=0, logprobs=0),
                            SamplingParams(temperature=0.8), SamplingParams(temperature=0, logprobs=2))
    result = Sampler(40, CPU).sample(logits, requests)
    expected = logits.log_softmax(-1)
    assert result.logprobs[0] == pytest.approx(float(expected[0, result.token_ids[0]]), abs=1e-6)
    assert result.logprobs[1] == pytest.approx(float(expected[1].max()), abs=1e-6)
    assert result.logprobs[2] is None and result.top_logprobs[2] is None
    assert result.top_logprobs[1] == []
    top_values, top_ids = expected[0].topk(4)
    assert [token for token, _ in result.top_logprobs[0]] == top_ids.tolist()
    values = [value for _, value in result.top_logprobs[0]]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(top_values.tolist(), abs=1e-6)
    assert all(isinstance(token, int) for token, _ in result.top_logprobs[0])
    top_values, top_ids = expected[3].topk(2)
    assert [token for token, _ in result.top_logprobs[3]] == top_ids.tolist(), "each row reads its own top-n"
    assert [value for _, value in result.top_logprobs[3]] == pytest.approx(top_values.tolist(), abs=1e-6)


def test_only_rows_that_need_nothing_from_the_host_leave_their_tokens_on_the_device():
    plain = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=3)]
    assert Sampler.can_defer(requests_for(*plain))
    for needy in (SamplingParams(temperature=0, logprobs=1), SamplingParams(temperature=0, presence_penalty=0.5)):
        assert not Sampler.can_defer(requests_for(*plain, needy)), f"one row asking for logprobs={needy.logprobs}, presence_penalty={needy.presence_penalty} is enough to make the batch wait"


def test_tokens_left_on_the_device_are_the_ones_sample_returns():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(5))
    mixed = [SamplingParams(temperature=0), SamplingParams(temperature=2.0, seed=1),
             SamplingParams(temperature=1.5, top_k=5, seed=2), SamplingParams(temperature=2.0, top_p=0.9, seed=3)]
    sampler = Sampler(30, CPU)
    on_device = sampler.sample_on_device(logits, requests_for(*mixed))
    assert on_device.tolist() == sampler.sample(logits, requests_for(*mixed)).token_ids
    assert on_device.tolist() != logits.argmax(-1).tolist(), "the sampled rows drew, not took the argmax"
    greedy = requests_for(*[SamplingParams(temperature=0)] * 4)
    assert sampler.sample_on_device(logits, greedy).tolist() == logits.argmax(-1).tolist()
    forbid_best = SimpleNamespace(apply=lambda rows: rows.scatter(1, rows.argmax(-1, keepdim=True), -math.inf))
    second = logits.topk(2).indices[:, 1].tolist()
    assert sampler.sample_on_device(logits, greedy, forbid_best).tolist() == second, "the mask comes first"


def test_padded_vocabulary_row_is_sampled_whole():
    vocab, padded = 10, 16
    logits = torch.randn(4, padded, generator=torch.Generator().manual_seed(4))
    logits[:, vocab:] = -math.inf
    logits[3, vocab:] = 50.0  # a padded column the model prefers is still a column of the row
    requests = requests_for(SamplingParams(seed=1, logprobs=3), SamplingParams(temperature=0, presence_penalty=1.0),
                            SamplingParams(top_p=0.5), SamplingParams(temperature=0), prompt=[1])
    result = Sampler(vocab, CPU).sample(logits, requests)
    assert all(token < vocab for token in result.token_ids[:3])
    assert result.token_ids[3] >= vocab


def test_logits_that_do_not_fit_the_batch_are_refused():
    sampler = Sampler(10, CPU)
    with pytest.raises(ValueError, match="one row per request"):
        sampler.sample(torch.zeros(2, 8), requests_for(SamplingParams(), SamplingParams()))
    with pytest.raises(ValueError, match=r"expected \[1, >= 10\]"):
        sampler.sample(torch.zeros(2, 10), requests_for(SamplingParams()))
    with pytest.raises(ValueError, match="one row per request"):
        sampler.sample_on_device(torch.zeros(2, 8), requests_for(SamplingParams(), SamplingParams()))


def test_a_batch_with_new_params_is_not_sampled_with_the_last_batchs_settings():
    """The sampler keeps a batch's settings on the device while the same requests fill the same
    rows; new requests (with new params) in those rows must be sampled with theirs at once (a tiny
    temperature, then a huge one: 64 rows cannot all pick the argmax again, (1/8)**64)."""
    sampler = Sampler(8, CPU, torch.Generator().manual_seed(0))
    logits = torch.zeros(64, 8)
    logits[:, 3] = 1.0
    only_best = SamplingParams(temperature=1e-4)
    assert sampler.sample(logits, requests_for(*[only_best] * 64)).token_ids == [3] * 64
    any_token = SamplingParams(temperature=1e6)
    assert set(sampler.sample(logits, requests_for(*[any_token] * 64)).token_ids) != {3}
    assert sampler.sample(logits, requests_for(*[only_best] * 64)).token_ids == [3] * 64


def test_the_cpus_inverse_cdf_draw_skips_tokens_of_no_probability_at_every_edge():
    """The CPU's draw (one uniform number per row): a token of no probability is never chosen,
    whether it sits first, between others or last, and whatever the uniform number, including
    those whose product with the row's total rounds to the total itself."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0],
                          [0.3, 0.0, 0.0, 0.7, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 2.0]])
    below_one = 1 - 2 ** -24  # the largest float32 under 1: its product with a total may round up to it
    for u in [0.0, 0.25, 0.3, 0.5, 0.9999, below_one, 1.0]:
        drawn = inverse_cdf(probs, torch.full((3, 1), u)).tolist()
        assert all(probs[row, token] > 0 for row, token in enumerate(drawn)), (u, drawn)
    assert inverse_cdf(probs, torch.tensor([[0.49], [0.29], [0.0]])).tolist() == [1, 0, 4]
    assert inverse_cdf(probs, torch.tensor([[0.5], [0.3], [0.7]])).tolist() == [3, 3, 4]
