"""The kernels at real model shapes on a CUDA GPU, against their torch twins on the same GPU.

Shapes: Llama-3.2-1B (32 q heads, 8 kv heads, head dim 64) and Qwen2.5-7B (28 q heads, 4 kv
heads, head dim 128: a GQA group of 7, not a power of two); contexts 1..4096, batches up to 128,
bfloat16 (untestable in the interpreter for the attention kernels) and float16.
"""

import math

import pytest
import torch

from lightllm_nb.kernels import (
    add_rmsnorm, add_rmsnorm_torch, decode_attention, decode_attention_torch, decode_num_splits,
    decode_workspace_numel, prefill_attention, prefill_attention_torch, rmsnorm, rmsnorm_torch,
    rotary_kv_write, rotary_kv_write_torch, silu_mul, silu_mul_torch,
)
# pytest puts tests/ on sys.path, so the CPU file's input builders are shared, not copied.
from test_kernels import _close, _fused_qkv, _hf_rmsnorm, _hf_rotary, _kv_setup, _randn, _rope_tables

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16]
MODELS = {"llama-1b": (32, 8, 64), "qwen-7b": (28, 4, 128)}


def _gen(seed):
    return torch.Generator("cuda").manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [2048, 3584, 4096])
def test_rmsnorm_gpu(dtype, hidden):
    gen = _gen(hidden + DTYPES.index(dtype))
    x = _randn(gen, 333, hidden, dtype=dtype) * 3
    residual = _randn(gen, 333, hidden, dtype=dtype) * 5
    weight = 1 + _randn(gen, hidden, dtype=dtype) * 0.1
    expected = rmsnorm_torch(x, weight, 1e-5)
    torch.testing.assert_close(expected, _hf_rmsnorm(x, weight, 1e-5), rtol=0, atol=0)
    _close(rmsnorm(x, weight, 1e-5), expected, dtype)

    summed = residual + x
    residual_torch, residual_kernel = residual.clone(), residual.clone()
    out_torch, _ = add_rmsnorm_torch(x, residual_torch, weight, 1e-5)
    out, _ = add_rmsnorm(x, residual_kernel, weight, 1e-5)
    # On the GPU the float32 -> bf16/fp16 rounding is round-to-nearest-even, as in torch.
    torch.testing.assert_close(residual_kernel, summed, rtol=0, atol=0)
    _close(out, out_torch, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
def test_rotary_kv_write_gpu(dtype, model):
    num_q_heads, num_kv_heads, head_dim = MODELS[model]
    gen = _gen(17 + DTYPES.index(dtype))
    cos, sin = (t.cuda() for t in _rope_tables(8192, head_dim, base=500000.0))
    _, q, k, v = _fused_qkv(gen, 1500, num_q_heads, num_kv_heads, head_dim, dtype)
    positions = torch.randint(0, 8192, (1500,), generator=gen, device="cuda")
    slots = torch.randperm(300_000, generator=gen, device="cuda")[:1500]
    results = []
    for fn in (rotary_kv_write_torch, rotary_kv_write):
        q_out = q.clone()
        k_cache = torch.full((300_000, num_kv_heads, head_dim), float("nan"), dtype=dtype, device="cuda")
        v_cache = torch.full_like(k_cache, float("nan"))
        fn(q_out, k, v, positions, cos, sin, k_cache, v_cache, slots)
        results.append((q_out, k_cache, v_cache))
    (q_torch, k_torch, v_torch), (q_out, k_cache, v_cache) = results
    _close(q_torch, _hf_rotary(q, positions, cos, sin), dtype)
    _close(k_torch[slots], _hf_rotary(k, positions, cos, sin), dtype)
    _close(q_out, q_torch, dtype)
    _close(k_cache[slots], k_torch[slots], dtype)
    torch.testing.assert_close(v_cache, v_torch, rtol=0, atol=0, equal_nan=True)
    assert k_cache.isnan().sum() == k_torch.isnan().sum()  # no slot outside `slots` written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ffn", [8192, 18944])
def test_silu_mul_gpu(dtype, ffn):
    gate_up = _randn(_gen(ffn), 333, 2 * ffn, dtype=dtype) * 2
    _close(silu_mul(gate_up), silu_mul_torch(gate_up), dtype)


def _decode_inputs(seed, model, dtype, kv_lens):
    num_q_heads, num_kv_heads, head_dim = MODELS[model]
    gen = _gen(seed)
    k_cache, v_cache, req_to_token, req_rows = _kv_setup(gen, kv_lens, num_kv_heads, head_dim, dtype)
    _, q, _, _ = _fused_qkv(gen, len(kv_lens), num_q_heads, num_kv_heads, head_dim, dtype)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, req_to_token, req_rows, lens, 1 / math.sqrt(head_dim)


def _random_lens(seed, batch, longest):
    return torch.randint(1, longest + 1, (batch,), generator=torch.Generator().manual_seed(seed)).tolist()


DECODE_BATCHES = {
    "one-long": [4096],
    "mixed": [1, 2, 63, 64, 65, 1000, 4096],
    "b128": _random_lens(0, 128, 4096),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batch", DECODE_BATCHES)
def test_decode_attention_gpu(dtype, model, batch):
    inputs = _decode_inputs(3, model, dtype, DECODE_BATCHES[batch])
    expected = decode_attention_torch(*inputs)
    _close(decode_attention(*inputs), expected, dtype)
    _close(decode_attention(*inputs, max_kv_len=4096, num_splits=1), expected, dtype)
    # The fused merge under real concurrency: many splits finishing in any order, one set of
    # counters reused call after call (as by a step's layers); every call gives the same bits.
    counters = torch.zeros(inputs[0].shape[0] * inputs[1].shape[1], dtype=torch.int32, device="cuda")
    first = decode_attention(*inputs, max_kv_len=4096, num_splits=64, split_counters=counters)
    _close(first, expected, dtype)
    for _ in range(20):
        assert torch.equal(decode_attention(*inputs, max_kv_len=4096, num_splits=64, split_counters=counters), first)
    assert not counters.any()


@pytest.mark.parametrize("model", MODELS)
def test_decode_attention_cuda_graph(model):
    """Captured once with splits sized for the longest context, replayed with other lengths: the
    launch must not sync with the host, and the splits must follow each request's current length."""
    kv_lens = _random_lens(1, 16, 4096)
    q, k_cache, v_cache, req_to_token, req_rows, lens, scale = _decode_inputs(5, model, torch.bfloat16, kv_lens)
    num_q_heads, num_kv_heads, head_dim = MODELS[model]
    splits = decode_num_splits(16, num_kv_heads, 4096, q.device)
    workspace = torch.empty(decode_workspace_numel(16, num_q_heads, head_dim, splits), device="cuda")
    graph_lens = lens.clone()

    def step():
        return decode_attention(q, k_cache, v_cache, req_to_token, req_rows, graph_lens, scale,
                                max_kv_len=4096, workspace=workspace)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for new_lens in (lens // 3 + 1, lens):
        graph_lens.copy_(new_lens)
        graph.replay()
        expected = decode_attention_torch(q, k_cache, v_cache, req_to_token, req_rows, new_lens, scale)
        _close(out, expected, torch.bfloat16)


PREFILL_BATCHES = {
    # (q_lens, kv_lens): one long fresh prompt; a mix of fresh prompts around the 64-token
    # blocks, prefix-cache hits, chunked-prefill continuations and decode rows (q_len 1).
    "one-long": ([4096], [4096]),
    "mixed": ([1, 63, 64, 65, 517, 1, 2048, 300], [1, 63, 64, 1065, 517, 3001, 4096, 1300]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batch", PREFILL_BATCHES)
def test_prefill_attention_gpu(dtype, model, batch):
    q_lens, kv_lens = PREFILL_BATCHES[batch]
    num_q_heads, num_kv_heads, head_dim = MODELS[model]
    gen = _gen(9)
    k_cache, v_cache, req_to_token, req_rows = _kv_setup(gen, kv_lens, num_kv_heads, head_dim, dtype)
    _, q, _, _ = _fused_qkv(gen, sum(q_lens), num_q_heads, num_kv_heads, head_dim, dtype)
    q_starts = torch.tensor([0] + q_lens, device="cuda").cumsum(0).int()
    lens = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
    args = (q, k_cache, v_cache, req_to_token, req_rows, q_starts, lens, 1 / math.sqrt(head_dim))
    expected = prefill_attention_torch(*args)
    prefill_attention(*args, max_q_len=max(q_lens))  # compile before watching for syncs
    torch.cuda.set_sync_debug_mode("error")  # with max_q_len given, the launch must not sync
    try:
        out = prefill_attention(*args, max_q_len=max(q_lens))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _close(out, expected, dtype)


def test_kv_buffer_past_int32_offsets():
    """Slots whose element offset (slot * Hkv * D) passes 2^31: every kernel that indexes the KV
    buffers must do that arithmetic in 64 bits."""
    num_q_heads, num_kv_heads, head_dim = MODELS["qwen-7b"]
    num_slots = 2 ** 31 // (num_kv_heads * head_dim) + 4096  # 4.3 GB per bf16 buffer
    k_cache = torch.empty((num_slots, num_kv_heads, head_dim), dtype=torch.bfloat16, device="cuda")
    v_cache = torch.empty_like(k_cache)
    gen = _gen(13)
    kv_len = 3000
    # The context lives in the top slots, shuffled; a few low slots check the small offsets still work.
    slots = torch.cat([torch.arange(num_slots - 2990, num_slots, device="cuda"), torch.arange(10, device="cuda")])
    slots = slots[torch.randperm(kv_len, generator=gen, device="cuda")]
    _, q_all, k, v = _fused_qkv(gen, kv_len, num_q_heads, num_kv_heads, head_dim, torch.bfloat16)
    cos, sin = (t.cuda() for t in _rope_tables(kv_len, head_dim))
    positions = torch.arange(kv_len, device="cuda")
    rotary_kv_write(q_all.clone(), k, v, positions, cos, sin, k_cache, v_cache, slots)
    # The same kernel writing to small slots is the exact oracle for the addressing (the torch twin
    # rounds the rotation without FMA, so it differs by an ulp in a few elements: checked loosely).
    k_low, v_low = torch.empty_like(k), torch.empty_like(v)
    rotary_kv_write(q_all.clone(), k, v, positions, cos, sin, k_low, v_low, torch.arange(kv_len, device="cuda"))
    torch.testing.assert_close(k_cache[slots], k_low, rtol=0, atol=0)
    torch.testing.assert_close(v_cache[slots], v, rtol=0, atol=0)
    k_twin = torch.empty_like(k)
    rotary_kv_write_torch(q_all.clone(), k, v, positions, cos, sin, k_twin, v.clone(), torch.arange(kv_len))
    _close(k_low, k_twin, torch.bfloat16)

    req_to_token = slots.int()[None, :]
    req_rows = torch.zeros(1, dtype=torch.int64, device="cuda")
    lens = torch.tensor([kv_len], device="cuda")
    scale = 1 / math.sqrt(head_dim)
    decode_args = (q_all[-1:], k_cache, v_cache, req_to_token, req_rows, lens, scale)
    _close(decode_attention(*decode_args), decode_attention_torch(*decode_args), torch.bfloat16)
    q_starts = torch.tensor([0, kv_len], dtype=torch.int32, device="cuda")
    prefill_args = (q_all, k_cache, v_cache, req_to_token, req_rows, q_starts, lens, scale)
    _close(prefill_attention(*prefill_args), prefill_attention_torch(*prefill_args), torch.bfloat16)
