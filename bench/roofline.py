"""Model shapes used by the benchmarks, and the bandwidth/compute bounds we compare against.

A decode step can be no faster than reading the weights plus every sequence's K/V once, nor than
doing its FLOPs at the measured GEMM rate; a workload's ceiling sums those bounds over an ideal
schedule (every request in flight from the start).
"""

from __future__ import annotations

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES = {
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                     max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # Qwen2.5-0.5B's shape (speed depends on the shape, not on the bias terms, which are left out).
    "qwen-0.5b": dict(model_type="llama", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                      rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                     max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


def decode_step_floor(weight_bytes: int, kv_bytes_per_token: int, contexts: list[int], bandwidth: float) -> float:
    """Seconds to read the weights and each sequence's cached K/V once."""
    return (weight_bytes + sum(contexts) * kv_bytes_per_token) / bandwidth


def _matmul_params(config, weight_bytes: int) -> float:
    # Every weight is used in a GEMM except the embedding table when the head has its own matrix.
    params = weight_bytes / 2
    return params if config.tie_word_embeddings else params - config.vocab_size * config.hidden_size


def workload_ceiling(config, weight_bytes: int, prompt_lens: list[int], output_lens: list[int],
                     bandwidth: float, flop_rate: float) -> float:
    """Least seconds for the whole workload: prefill at the GEMM rate, then each decode step at
    max(bytes / bandwidth, FLOPs / rate) with every unfinished sequence in the batch."""
    params = _matmul_params(config, weight_bytes)
    attn = 4 * config.num_layers * config.num_q_heads * config.head_dim  # FLOPs per (query, key) pair
    kv = config.kv_bytes_per_token
    prefill_flops = sum(2 * params * p + attn * p * (p + 1) / 2 for p in prompt_lens)
    total = prefill_flops / flop_rate
    for t in range(max(output_lens)):
        contexts = [p + t for p, o in zip(prompt_lens, output_lens) if o > t]
        bytes_read = weight_bytes + sum(contexts) * kv
        flops = 2 * params * len(contexts) + attn * sum(contexts)
        total += max(bytes_read / bandwidth, flops / flop_rate)
    return total
