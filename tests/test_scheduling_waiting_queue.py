"""The waiting queue's fairness order, model-free: fewest running requests first (a user the
scheduler's running counts leave out has none), then the user admitted least recently, a user
never admitted before anyone."""

from lightllm_nb.sampling_params import SamplingParams
from lightllm_nb.scheduling.request import Request
from lightllm_nb.scheduling.waiting_queue import WaitingQueue


def request(rid: str, user: str) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=4), user=user)


def order(queue: WaitingQueue, running_per_user: dict) -> list[str]:
    return [r.request_id for r in queue.in_admission_order(running_per_user)]


def test_a_user_with_nothing_running_goes_before_one_with_a_request_running():
    queue = WaitingQueue()
    queue.add(request("a1", "alice"))
    queue.add(request("b1", "bob"))
    # the scheduler's counts name only users with something running: bob is missing, so 0
    assert order(queue, {"alice": 1}) == ["b1", "a1"]
    assert order(queue, {"alice": 1, "bob": 2}) == ["a1", "b1"]


def test_a_user_never_admitted_goes_before_the_first_user_admitted():
    queue = WaitingQueue()
    first = request("a1", "alice")
    queue.add(first)
    queue.add(request("a2", "alice"))
    queue.take(first)                      # alice's admission number is 0, the smallest there is
    queue.add(request("b1", "bob"))
    assert order(queue, {}) == ["b1", "a2"]
    queue.take(queue.in_admission_order({}).__next__())   # bob's turn: admission number 1
    queue.add(request("b2", "bob"))
    assert order(queue, {}) == ["a2", "b2"]               # now alice was admitted less recently
