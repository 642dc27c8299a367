"""Start-up choices left to the engine: batch limits (max_running / max_batch_tokens) and CPU threads."""

import os

import pytest
import torch

from lightllm_nb import Engine
from lightllm_nb.engine.arguments import BatchLimitError, check_batch_limits
from lightllm_nb.engine.engine_setup import choose_batch_limits
from lightllm_nb.models.config import ModelConfig

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def config(hidden, ffn, heads, kv_heads, head_dim, layers):
    return ModelConfig.from_hf(dict(model_type="llama", vocab_size=128256, hidden_size=hidden,
                                    intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5,
                                    max_position_embeddings=131072))


LLAMA_1B = config(2048, 8192, 32, 8, 64, 16)
LLAMA_8B = config(4096, 14336, 32, 8, 128, 32)
DEMO = config(576, 1536, 9, 3, 64, 30)  # SmolLM2-135M


def test_a_large_pool_gets_the_largest_batch_and_a_long_prefill_chunk():
    # An H200 holds about 3.4M tokens of the 1B shape's K/V.
    assert choose_batch_limits(LLAMA_1B, torch.bfloat16, CUDA, 3_400_000, None, None) == (256, 8192)


def test_a_small_pool_gets_a_batch_that_fills_it_at_the_typical_context():
    # 8B on a 24 GB card: ~30k tokens of K/V fill 29 requests of 1024 tokens -> 16 (a graph bucket).
    assert choose_batch_limits(LLAMA_8B, torch.bfloat16, CUDA, 30_000, None, None) == (16, 2048)
    # Never fewer than 8 running on a GPU, however small the pool.
    assert choose_batch_limits(LLAMA_8B, torch.bfloat16, CUDA, 1_000, None, None) == (8, 2048)


def test_activation_memory_caps_the_prefill_chunk():
    # 8192 running requests' worth of chunk would be 262k tokens; 1 GiB of float32 activations
    # of the 8B shape (256 KiB a token) allows 4096.
    assert choose_batch_limits(LLAMA_8B, torch.float32, CUDA, 10**8, None, None) == (256, 4096)


def test_explicit_values_win_and_keep_the_pair_consistent():
    assert choose_batch_limits(LLAMA_1B, torch.bfloat16, CUDA, 3_400_000, 64, 1024) == (64, 1024)
    # An explicit max_running sizes the automatic chunk (32 tokens each, at least 2048) ...
    assert choose_batch_limits(LLAMA_1B, torch.bfloat16, CUDA, 3_400_000, 128, None) == (128, 4096)
    assert choose_batch_limits(LLAMA_1B, torch.bfloat16, CPU, 10**6, 4096, None) == (4096, 4096)
    # ... and an explicit small chunk caps the automatic max_running.
    assert choose_batch_limits(LLAMA_1B, torch.bfloat16, CUDA, 3_400_000, None, 100) == (100, 100)


def test_cpu_defaults_keep_a_step_near_a_second_and_fit_the_pool():
    """On 2 cores a 2048-token step of the demo model froze the other streams for 11-46 s; the rule
    gives it what 2 cores prefill in about a second, and no more running than its pool fills."""
    demo_cpu = lambda kv_tokens, cpus, **kw: choose_batch_limits(DEMO, torch.float32, CPU, kv_tokens, None, None,
                                                                 cpus=cpus, **kw)
    assert demo_cpu(8192, cpus=2) == (32, 256)      # bench/cpu_demo.py's engine: 16 streams still run together
    assert demo_cpu(23_301, cpus=2) == (32, 256)    # the default 1 GiB pool
    assert demo_cpu(23_301, cpus=1) == (16, 128)
    assert demo_cpu(10**6, cpus=16) == (128, 2048)  # more cores: longer steps cost the same time
    assert demo_cpu(64, cpus=2) == (4, 256)         # a small pool: a few requests, not 128
    assert demo_cpu(64, cpus=2, page_size=32) == (2, 256)  # never more running than the pool has pages
    # A bigger model gets fewer tokens a step: Llama-3.2-1B's layers cost 9x the demo's a token.
    assert choose_batch_limits(LLAMA_1B, torch.float32, CPU, 10**6, None, None, cpus=2) == (4, 16)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_a_bad_limit_says_what_to_pass(bad):
    with pytest.raises(ValueError, match="is invalid: it must be an integer >= 1, or None"):
        check_batch_limits(bad, None)


def test_the_engine_reports_its_chosen_limits(tiny_model):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False) as engine:
        stats = engine.stats()
        # The tiny model costs next to nothing a token: the largest CPU step and batch.
        assert (stats["max_running"], stats["max_batch_tokens"]) == (128, 2048)
        assert engine.pool.max_requests >= 128
    with Engine(str(folder), device="cpu", max_running=6, progress=False) as engine:
        assert (engine.stats()["max_running"], engine.stats()["max_batch_tokens"]) == (6, 2048)
    with Engine(str(folder), device="cpu", kv_tokens=64, progress=False) as engine:
        assert engine.stats()["max_running"] == engine.pool.max_requests == 4


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model started loading before the arguments were checked")
    monkeypatch.setattr("lightllm_nb.engine.engine.load_checkpoint", refuse)


@pytest.mark.parametrize("limits, says", [
    (dict(max_running=10**9), "max_running=1000000000 is more requests at once than this engine runs "
                              r"\(at most 65536\)"),
    (dict(max_running=8, max_batch_tokens=4), "max_batch_tokens=4 is less than max_running=8: each running "
                                              "request decodes a token every step, so raise max_batch_tokens"),
    (dict(max_running=100, kv_tokens=64), r"max_running=100 is more than the KV cache's 64 pages \(kv_tokens=64\)"),
    (dict(max_running=9, kv_tokens=64, page_size=8), "max_running=9 is more than the KV cache's 8 pages"),
    (dict(kv_tokens=3, page_size=4), r"kv_tokens=3 is less than one page \(page_size=4\)"),
])
def test_limits_that_cannot_work_are_refused_before_the_model_loads(no_model_load, limits, says):
    with pytest.raises(BatchLimitError, match=says):
        Engine("demo", device="cpu", **limits)


def test_limits_are_checked_against_the_sized_pool_before_its_rows_are_allocated():
    # Once the pool is sized (after the load when kv_tokens was not given): its pages ...
    with pytest.raises(BatchLimitError, match="lower max_running to 23301 or less"):
        check_batch_limits(60_000, None, kv_tokens=23_301, max_context=8192)
    # ... and the rows' token tables: 4096 rows of a 131072-token context would take 2 GiB.
    with pytest.raises(BatchLimitError, match="need 2.0 GiB of token tables .* lower max_running to 2047 or less"):
        check_batch_limits(4096, None, kv_tokens=3_400_000, max_context=131072)
    check_batch_limits(256, None, kv_tokens=3_400_000, max_context=131072)  # the GPU default: 128 MiB


def test_a_limit_error_names_the_callers_own_flags():
    with pytest.raises(BatchLimitError) as refused:
        check_batch_limits(8, 4)
    flags = {"max_running": "--max-num-seqs", "max_batch_tokens": "--max-num-batched-tokens"}
    assert refused.value.naming(flags).startswith("--max-num-batched-tokens=4 is less than --max-num-seqs=8")


def test_cpu_threads_are_lowered_to_the_usable_cpus_never_raised():
    from lightllm_nb.engine.engine_setup import limit_cpu_threads, usable_cpus

    before = torch.get_num_threads()
    try:
        assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
        torch.set_num_threads(usable_cpus() + 3)
        limit_cpu_threads(CUDA)  # not the CPU path: untouched
        assert torch.get_num_threads() == usable_cpus() + 3
        limit_cpu_threads(CPU)
        assert torch.get_num_threads() == usable_cpus()
        torch.set_num_threads(1)
        limit_cpu_threads(CPU)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
