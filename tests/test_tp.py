"""Tensor parallelism on the CPU: two (or four) real processes over gloo running one tiny model.

Greedy output must equal tp=1 and Hugging Face transformers, prefix-cache hits included (their
slot mappings travel to the workers in the step messages), and a worker killed mid-run must end
the running request with a clear error, not hang the engine.
"""

import os
import signal
import time

import pytest

from lightllm_nb.engine.engine import Engine
from lightllm_nb.models.config import ModelConfig
from lightllm_nb.parallel.shard import ShardPlan
from lightllm_nb.sampling_params import SamplingParams
from tiny_models import hf_greedy

PROMPTS = [[1, 5, 9, 200, 3000], [1, 77, 88], [1, 400, 401, 402, 403, 404, 405, 406, 407]]
MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def _engine(folder, tp):
    return Engine(str(folder), device="cpu", dtype="float64", tp=tp, kv_tokens=1024, progress=False)


def _run(engine, prompts, sampling=GREEDY, *, until=None):
    """Low-level API, one thread: {prompt index: Completion}. `until(step_number)` runs after each step."""
    ids = {engine.add_request(prompt_token_ids=p, sampling=sampling): i for i, p in enumerate(prompts)}
    done, steps = {}, 0
    deadline = time.monotonic() + 60
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "the engine did not finish its requests within 60 s"
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out.completion
        steps += 1
        if until is not None:
            until(steps)
    return done


def _greedy_rounds(engine, prompts):
    """Token ids of a batch, then of a second batch that extends the first one's prompts
    (prefix-cache hits) ; also returns how many prompt tokens the second round found cached."""
    first = _run(engine, prompts)
    longer = [p + first[i].token_ids[:3] for i, p in enumerate(prompts)]
    second = _run(engine, longer)
    tokens = [first[i].token_ids for i in range(len(prompts))] + [second[i].token_ids for i in range(len(prompts))]
    cached = sum(second[i].metrics["cached_tokens"] for i in range(len(prompts)))
    return tokens, longer, cached


def _check_greedy(folder, hf, sharded):
    """tp>1 equals tp=1 and HF on two rounds (the second hits the prefix cache)."""
    with _engine(folder, 1) as single:
        want, longer, _ = _greedy_rounds(single, PROMPTS)
    assert want == [hf_greedy(hf, p, MAX_TOKENS) for p in PROMPTS + longer]
    got, _, cached = _greedy_rounds(sharded, PROMPTS)
    assert got == want
    assert cached > 0, "the second round should have reused the first round's prompts from the prefix cache"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_llama_greedy_equals_tp1_and_hf(tiny_model, tp):
    folder, hf = tiny_model("llama")
    with _engine(folder, tp) as sharded:
        # 2 KV heads: at tp=4 each one is kept by two ranks.
        assert sharded.model.config.num_kv_heads == max(1, 2 // tp) and len(sharded.model.workers) == tp - 1
        _check_greedy(folder, hf, sharded)
        workers = sharded.model.workers
    assert not any(w.is_alive() for w in workers), "close() must stop the worker processes"


@pytest.mark.timeout(120)
def test_tp_qwen2_greedy_then_a_killed_worker_fails_requests_with_a_clear_error(tiny_model):
    folder, hf = tiny_model("qwen2")  # q/k/v biases, tied (vocabulary-sharded) embedding and head
    engine = _engine(folder, 2)
    _check_greedy(folder, hf, engine)
    worker = engine.model.workers[0]

    def kill_after_three_steps(step):
        if step == 3:
            os.kill(worker.pid, signal.SIGKILL)

    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    done = _run(engine, PROMPTS[:2], long, until=kill_after_three_steps)
    for completion in done.values():
        assert completion.finish_reason == "error"
        assert "tensor-parallel rank 1" in completion.error and "exited with code -9" in completion.error
        assert len(completion.token_ids) < 400
    # Later requests fail at once with the same explanation; closing does not wait on the dead rank.
    again = _run(engine, PROMPTS[:1])
    assert again[0].finish_reason == "error" and "start a new one" in again[0].error
    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 15


def _config(heads, kv_heads, intermediate=128):
    return ModelConfig.from_hf(dict(model_type="llama", vocab_size=1000, hidden_size=64, num_hidden_layers=1,
                                    intermediate_size=intermediate, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads))


def test_shard_plan_refuses_uneven_splits_and_says_which_tp_works():
    with pytest.raises(ValueError, match=r"tp=3 cannot split .*use tp in \[1, 2, 4\]"):
        ShardPlan.make(_config(4, 2), 0, 3)
    with pytest.raises(ValueError, match=r"use tp in \[1, 3\]"):  # 9 heads, 3 KV heads: SmolLM2-135M
        ShardPlan.make(_config(9, 3, 1536), 0, 2)


def test_shard_plan_replicates_kv_heads_and_pads_the_vocabulary():
    import torch

    config = _config(8, 2)
    plans = [ShardPlan.make(config, rank, 4) for rank in range(4)]
    assert [p.first_kv_head for p in plans] == [0, 0, 1, 1] and {p.kv_heads for p in plans} == {1}
    embed = torch.arange(1000.0).unsqueeze(1).expand(1000, 64)
    parts = [p.slice("model.embed_tokens.weight", embed) for p in plans]
    assert [part.shape[0] for part in parts] == [250] * 4
    plans = [ShardPlan.make(_config(6, 6, 129), rank, 3) for rank in range(3)]  # 1000 rows do not split in 3
    parts = [p.slice("lm_head.weight", embed) for p in plans]
    assert all(part.shape[0] == 334 for part in parts) and not parts[-1][-2:].any()
    assert torch.equal(torch.cat(parts)[:1000], embed)
    o = torch.randn(64, 6 * plans[0].head_dim)
    assert torch.equal(torch.cat([p.slice("model.layers.0.self_attn.o_proj.weight", o) for p in plans], 1), o)


def test_bad_tp_settings_are_refused_before_loading(tiny_model):
    from lightllm_nb.loading import load_checkpoint

    with pytest.raises(ValueError, match="tp=0 is invalid"):
        Engine("demo", tp=0)
    folder, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="pass the model's name or path, not a Checkpoint"):
        Engine(load_checkpoint(str(folder)), tp=2, device="cpu")
