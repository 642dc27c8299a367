"""Start-up choices left to the engine: batch limits (max_running / max_batch_tokens) and CPU threads."""

import os

import pytest
import torch

from lightllm_nb import Engine
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


def test_cpu_defaults_stay_small():
    assert choose_batch_limits(LLAMA_1B, torch.float32, CPU, 10**6, None, None) == (128, 2048)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_a_bad_limit_says_what_to_pass(bad):
    with pytest.raises(ValueError, match="positive integer, or None"):
        choose_batch_limits(LLAMA_1B, torch.bfloat16, CPU, 10**6, bad, None)


def test_the_engine_reports_its_chosen_limits(tiny_model):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False) as engine:
        stats = engine.stats()
        assert (stats["max_running"], stats["max_batch_tokens"]) == (128, 2048)
        assert engine.pool.max_requests >= 128
    with Engine(str(folder), device="cpu", max_running=6, progress=False) as engine:
        assert (engine.stats()["max_running"], engine.stats()["max_batch_tokens"]) == (6, 2048)


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
