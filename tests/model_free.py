"""The real scheduler, KV pool and prefix cache driven without a model: each scheduled token is
"computed" at once, so scheduling tests run in milliseconds and say exactly what they check."""

import torch

from lightllm_nb.kv.kv_pool import KVPool
from lightllm_nb.scheduling.admission import AggressivePolicy
from lightllm_nb.scheduling.request import Request
from lightllm_nb.scheduling.scheduler import Scheduler
from lightllm_nb.sampling_params import SamplingParams

SAMPLED = 7  # the token every model-free step "samples"
# These tests take milliseconds: one still running after a minute is stuck in an infinite loop of
# the code under test (which nothing but time can show), so it fails then, named, rather than at the
# suite's 300 s limit. Test modules apply it: pytestmark = pytest.mark.timeout(HANG_SECONDS).
HANG_SECONDS = 60


def make_scheduler(*, capacity=256, max_running=4, policy=None, page_size=1, max_batch_tokens=64, rows=None,
                   **kwargs):
    """`rows`: req_to_token rows in the pool (default max_running, as the engine sizes it)."""
    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=capacity, page_size=page_size,
                  max_requests=rows or max_running, max_context=capacity, dtype=torch.float32, device=torch.device("cpu"))
    return Scheduler(pool, policy or AggressivePolicy(), max_batch_tokens=max_batch_tokens, max_running=max_running,
                     **kwargs)


def request(rid, user="default", *, prompt_len=4, max_tokens=3, priority=0):
    return Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens),
                   user=user, priority=priority)


def step(scheduler):
    """One engine step without a model: every scheduled token is computed, each request whose
    tokens are all computed samples one more, and finishes at max_tokens. Returns the step's decisions."""
    batch = scheduler.schedule()
    for req, n in batch.items:
        req.num_computed += n
        if req.num_computed == len(req.token_ids):
            req.token_ids.append(SAMPLED)
            if req.num_output >= req.sampling.max_tokens:
                batch.decisions.append(scheduler.finish(req, "length"))
    return batch.decisions


def run(scheduler, steps=1000):
    """Decisions of every step until the scheduler is idle."""
    history = []
    while scheduler.has_work():
        history.append(step(scheduler))
        assert len(history) < steps, "no progress"
    return history
