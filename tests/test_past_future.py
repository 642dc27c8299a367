"""The Past-Future admission policy: the future-peak arithmetic, conditioned sampling, cold start."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lightllm_nb.scheduling.admission import PoolView
from lightllm_nb.scheduling.past_future import PastFuturePolicy, future_peak
from lightllm_nb.scheduling.request import Request
from lightllm_nb.sampling_params import SamplingParams


def make_request(prompt_len: int, produced: int = 0, max_tokens: int = 100, rid: str = "r") -> Request:
    req = Request(rid, [1] * prompt_len, SamplingParams(max_tokens=max_tokens))
    req.token_ids.extend([2] * produced)
    req.admit_time = 0.0  # as if it had been admitted: only those enter the history
    return req


def test_requests_cancelled_before_admission_stay_out_of_the_history():
    policy = PastFuturePolicy(min_history=1)
    queued = Request("q", [1, 2], SamplingParams(max_tokens=10))
    policy.record_finished(queued)
    assert len(policy.history) == 0
    policy.record_finished(make_request(2, produced=4))
    assert list(policy.history) == [4]


def policy_with_history(lengths, **kwargs) -> PastFuturePolicy:
    policy = PastFuturePolicy(**{"min_history": 1, **kwargs})
    for n in lengths:
        policy.record_finished(make_request(1, produced=n, max_tokens=max(n, 1)))
    return policy


def pool(capacity: int, page_size: int = 1) -> PoolView:
    return PoolView(capacity=capacity, free=capacity, page_size=page_size)


def brute_force_peak(held, remaining) -> int:
    """Step through time: at step t every request with t <= its remaining length holds held + t."""
    return max(sum(h + t for h, r in zip(held, remaining) if r >= t) for t in range(max(remaining) + 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 60)), min_size=1, max_size=25))
def test_future_peak_matches_a_step_by_step_simulation(requests):
    held, remaining = zip(*requests)
    assert future_peak(np.array(held), np.array(remaining))[0] == brute_force_peak(held, remaining)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=10), st.integers(1, 5), st.integers(0, 2**16))
def test_future_peak_handles_each_scenario_on_its_own(held, scenarios, seed):
    remaining = np.random.default_rng(seed).integers(0, 50, (scenarios, len(held)))
    peaks = future_peak(np.array(held), remaining)
    assert list(peaks) == [brute_force_peak(held, list(row)) for row in remaining]


def test_no_requests_peak_at_zero_in_every_scenario():
    assert future_peak(np.zeros(0, dtype=np.int64), np.zeros((3, 0))).tolist() == [0, 0, 0]

def test_admits_when_the_future_peak_fits():
    # Every past request produced exactly 10 tokens: each of the three will hold 50 + 10 at most.
    policy = policy_with_history([10] * 30, reserve=0.0)
    running = [make_request(50, rid="a"), make_request(50, rid="b")]
    verdict = policy.check(make_request(50, rid="c"), running, pool(200))
    assert verdict.admit
    assert verdict.numbers["peak"] == 180 and verdict.numbers["limit"] == 200
    assert "180" in verdict.reason and "200" in verdict.reason


def test_defers_with_the_numbers_when_the_future_peak_does_not_fit():
    policy = policy_with_history([10] * 30, reserve=0.0)
    running = [make_request(50, rid="a"), make_request(50, rid="b")]
    verdict = policy.check(make_request(50, rid="c"), running, pool(150))
    assert not verdict.admit
    assert verdict.numbers == {"peak": 180, "limit": 150, "capacity": 150, "running": 2, "history": 30,
                               "samples": 4}
    assert "180 > limit 150" in verdict.reason


def test_peak_counts_staggered_finishes():
    # Past lengths 10 and 100 (conditioned on 20 produced, "a" can only end at 100; "b" at 10 or 100).
    policy = policy_with_history([10, 100], reserve=0.0, samples=1, seed=3)
    a = make_request(5, produced=20, rid="a")   # holds 25, 80 more to go
    verdict = policy.check(make_request(5, rid="b"), [a], pool(10_000))
    # b ends at 10: peak max(25+10 + 5+10, 25+80) = 105; b ends at 100: 25+80 + 5+80 = 190.
    assert verdict.numbers["peak"] in (105, 190)


def test_the_worst_sampled_future_decides_when_futures_disagree():
    # Past lengths 10 and 100: each fresh request ends at 10 or at 100, so the 8 sampled futures
    # disagree. The policy must admit exactly when the worst of them fits, however good the best.
    history = [10, 100] * 10
    running = [make_request(50, rid="a"), make_request(50, rid="b")]
    candidate = make_request(50, rid="c")
    twin = policy_with_history(history, samples=8, seed=5)   # same seed: the same draws as the policy's
    finals = twin.sample_final_lengths(np.zeros(3, dtype=np.int64), np.full(3, 100))
    peaks = [brute_force_peak([50, 50, 50], list(row)) for row in finals]
    best, worst = min(peaks), max(peaks)
    assert best < worst, "the futures were meant to disagree"
    at_worst = policy_with_history(history, reserve=0.0, samples=8, seed=5).check(candidate, running, pool(worst))
    assert at_worst.admit and at_worst.numbers["peak"] == worst
    below = policy_with_history(history, reserve=0.0, samples=8, seed=5).check(candidate, running, pool(worst - 1))
    assert not below.admit and below.numbers["peak"] == worst, f"the best future ({best}) fits, the worst does not"


def test_reserve_lowers_the_limit():
    policy = policy_with_history([10] * 30, reserve=0.1)
    verdict = policy.check(make_request(50, rid="c"), [make_request(50, rid="a")], pool(130))
    assert verdict.numbers["limit"] == 117 and not verdict.admit   # peak 120 > 130 * 0.9


def test_pages_round_up_what_each_request_holds():
    policy = policy_with_history([10] * 30, reserve=0.0)
    verdict = policy.check(make_request(50, rid="c"), [make_request(50, rid="a")], pool(1024, page_size=16))
    assert verdict.numbers["peak"] == 2 * (50 + 10 + 15)


def test_cold_start_assumes_max_tokens_and_says_so():
    policy = PastFuturePolicy(min_history=20)
    for _ in range(5):
        policy.record_finished(make_request(1, produced=3))
    running = [make_request(10, max_tokens=100, rid="a")]
    candidate = make_request(10, max_tokens=100, rid="b")
    fits = policy.check(candidate, running, pool(232))          # limit 220 = peak 2 * 110
    assert fits.admit and "cold start" in fits.reason and "5 of 20" in fits.reason
    assert fits.numbers["peak"] == 220
    deferred = policy.check(candidate, running, pool(231))
    assert not deferred.admit and "cold start" in deferred.reason and "220 >" in deferred.reason
    alone = policy.check(make_request(120, max_tokens=100, rid="c"), [], pool(232))  # peak 220 = limit: it fits
    assert alone.admit and "cold start" in alone.reason and "220 <=" in alone.reason


def test_a_request_alone_is_admitted_even_above_the_limit():
    policy = policy_with_history([10] * 30)
    verdict = policy.check(make_request(500, max_tokens=600), [], pool(100))
    assert verdict.admit and "empty" in verdict.reason


def test_window_keeps_only_the_most_recent_lengths():
    policy = policy_with_history(range(1, 51), window=10)
    assert policy.history == list(range(41, 51))
    # Sampling sees only the window: a fresh request's final length is one of 41..50.
    finals = policy.sample_final_lengths(np.array([0]), np.array([1000]))
    assert set(finals.ravel()) <= set(range(41, 51))


@settings(max_examples=200, deadline=None)
@given(history=st.lists(st.integers(1, 500), min_size=1, max_size=50), produced=st.integers(0, 600),
       extra=st.integers(1, 400), seed=st.integers(0, 2**16))
def test_conditioned_samples_stay_between_produced_and_max_tokens(history, produced, extra, seed):
    policy = policy_with_history(history, seed=seed, samples=8)
    max_tokens = produced + extra
    finals = policy.sample_final_lengths(np.array([produced]), np.array([max_tokens]))
    assert finals.shape == (8, 1)
    assert (finals > produced).all() and (finals <= max_tokens).all()
    longer = [h for h in history if h > produced]
    allowed = {min(h, max_tokens) for h in longer} if longer else {max_tokens}
    assert set(finals.ravel()) <= allowed


def test_sampling_is_deterministic_for_a_seed():
    a, b = policy_with_history(range(1, 100), seed=7), policy_with_history(range(1, 100), seed=7)
    produced, cap = np.array([0, 10, 50]), np.array([200, 200, 200])
    assert (a.sample_final_lengths(produced, cap) == b.sample_final_lengths(produced, cap)).all()


def test_the_smallest_settings_are_accepted():
    policy = PastFuturePolicy(window=1, samples=1, reserve=0.0, min_history=1)
    assert (policy.window, policy.samples, policy.min_history) == (1, 1, 1)


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"samples": 0}, {"reserve": 1.0}, {"reserve": -0.1},
                                    {"min_history": 0}, {"window": 5, "min_history": 6}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PastFuturePolicy(**kwargs)


def test_the_history_counts_from_exactly_min_history_finished_requests():
    """Cold below min_history finished lengths (every request assumed to run to max_tokens), warm
    at exactly min_history: the sampled future, here far shorter than max_tokens, decides."""
    policy = policy_with_history([3, 3], min_history=3, samples=2)
    candidate = make_request(10, max_tokens=100)
    cold = policy.check(candidate, [make_request(10, max_tokens=100, rid="a")], pool(200))
    assert cold.numbers["history"] == 2 and cold.numbers["samples"] == 1 and not cold.admit
    policy.record_finished(make_request(1, produced=3, max_tokens=3))
    warm = policy.check(candidate, [make_request(10, max_tokens=100, rid="a")], pool(200))
    assert warm.numbers["history"] == 3 and warm.numbers["samples"] == 2 and warm.admit, warm.reason


def test_by_default_the_last_1000_finished_lengths_are_sampled_from():
    """The default window (1000, PastFuturePolicy's signature): the 1001st finished request pushes
    the first one out, so a single old outlier no longer shapes the futures sampled."""
    policy = PastFuturePolicy()
    for n in [500] + [10] * 1000:
        policy.record_finished(make_request(1, produced=n, max_tokens=n))
    assert len(policy.history) == 1000 and 500 not in policy.history
    finals = policy.sample_final_lengths(np.array([0] * 50), np.array([1000] * 50))
    assert (finals == 10).all(), "the outlier 500 left the window"


def test_by_default_five_finished_lengths_end_the_cold_start_and_draws_are_seeded_with_0():
    policy = PastFuturePolicy()
    candidate, running = make_request(10, max_tokens=100), [make_request(10, max_tokens=100, rid="a")]
    for n in range(1, 6):
        assert policy.check(candidate, running, pool(200)).numbers["samples"] == 1, "cold below 5"
        policy.record_finished(make_request(1, produced=n, max_tokens=n))
    assert policy.check(candidate, running, pool(200)).numbers["samples"] == 4, "warm at 5, 4 futures"
    default, seeded = PastFuturePolicy(), PastFuturePolicy(seed=0)
    for n in range(1, 6):
        default.record_finished(make_request(1, produced=n, max_tokens=n))
        seeded.record_finished(make_request(1, produced=n, max_tokens=n))
    produced, cap = np.array([0] * 20), np.array([9] * 20)
    assert (default.sample_final_lengths(produced, cap) == seeded.sample_final_lengths(produced, cap)).all()
