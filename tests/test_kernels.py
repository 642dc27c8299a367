"""Triton kernels against their torch twins, and the torch twins against naive formulas.

On a CPU-only machine conftest.py turns on Triton's interpreter, so shapes stay small. The
interpreter multiplies bfloat16 tl.dot operands as raw 16-bit integers, so the two attention
kernels are checked in bfloat16 only by test_kernels_gpu.py; everything else runs all three dtypes.
"""

import importlib
import math

import pytest
import torch

from lightllm_nb.kernels import (
    add_rmsnorm, add_rmsnorm_torch, decode_attention, decode_attention_torch, decode_workspace_numel,
    prefill_attention, prefill_attention_torch, rmsnorm, rmsnorm_torch, silu_mul, silu_mul_torch,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# bfloat16 tl.dot is wrong in the interpreter (see module docstring).
ATTENTION_DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4),
       # A bf16 ulp is up to 2^-7 relative and outputs are rounded twice (after normalizing and
       # after the weight multiply), so two ulps apart is still a match.
       torch.bfloat16: dict(rtol=2 ** -6, atol=1e-2),
       torch.float16: dict(rtol=1e-2, atol=1e-2)}


def _gen(seed, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, device=gen.device).to(dtype)


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


# ---------------------------------------------------------------- rmsnorm


def _hf_rmsnorm(x, weight, eps):
    # Transcribed from transformers' LlamaRMSNorm.forward.
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return (weight * hidden.to(x.dtype)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm(dtype):
    gen = _gen(10 + DTYPES.index(dtype))
    x = _randn(gen, 5, 48, dtype=dtype) * 3
    weight = 1 + _randn(gen, 48, dtype=dtype) * 0.1
    expected = rmsnorm_torch(x, weight, 1e-5)
    torch.testing.assert_close(expected, _hf_rmsnorm(x, weight, 1e-5), rtol=0, atol=0)
    out = rmsnorm(x, weight, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    _close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rmsnorm(dtype):
    gen = _gen(20 + DTYPES.index(dtype))
    x = _randn(gen, 6, 40, dtype=dtype)
    residual = _randn(gen, 6, 40, dtype=dtype) * 2
    weight = 1 + _randn(gen, 40, dtype=dtype) * 0.1
    summed = residual + x

    residual_torch = residual.clone()
    out_torch, returned = add_rmsnorm_torch(x, residual_torch, weight, 1e-6)
    assert returned is residual_torch
    torch.testing.assert_close(residual_torch, summed, rtol=0, atol=0)
    torch.testing.assert_close(out_torch, _hf_rmsnorm(summed, weight, 1e-6), rtol=0, atol=0)

    residual_kernel = residual.clone()
    out, returned = add_rmsnorm(x, residual_kernel, weight, 1e-6)
    assert returned is residual_kernel
    if dtype == torch.bfloat16:
        # The interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even,
        # so here the bf16 sum may be one ulp off; test_kernels_gpu.py checks it bit for bit.
        _close(residual_kernel, summed, dtype)
    else:
        torch.testing.assert_close(residual_kernel, summed, rtol=0, atol=0)
    _close(out, out_torch, dtype)


# ---------------------------------------------------------------- rotary (tested in test_fused_rotary_kv_write.py)


def _rope_tables(max_pos, head_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def _hf_rotary(x, positions, cos, sin):
    # HF apply_rotary_pos_emb: x * cos + rotate_half(x) * sin with tables duplicated over halves,
    # in float64 so that it is an oracle for every dtype.
    half = x.shape[-1] // 2
    c = torch.cat([cos, cos], dim=-1)[positions].unsqueeze(1).double()
    s = torch.cat([sin, sin], dim=-1)[positions].unsqueeze(1).double()
    xf = x.double()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * c + rotated * s).to(x.dtype)


def _fused_qkv(gen, tokens, num_q_heads, num_kv_heads, head_dim, dtype):
    """q, k, v as strided views of one [T, (Hq + 2 Hkv) * D] projection output, like the model."""
    qkv = _randn(gen, tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q_end, k_end = num_q_heads * head_dim, (num_q_heads + num_kv_heads) * head_dim
    return (qkv, qkv[:, :q_end].view(tokens, num_q_heads, head_dim),
            qkv[:, q_end:k_end].view(tokens, num_kv_heads, head_dim),
            qkv[:, k_end:].view(tokens, num_kv_heads, head_dim))


# ---------------------------------------------------------------- silu_mul


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gen = _gen(40 + DTYPES.index(dtype))
    ffn = 1030  # two column blocks, the second one ragged
    gate_up = _randn(gen, 3, 2 * ffn, dtype=dtype) * 2
    gate, up = gate_up.float()[:, :ffn], gate_up.float()[:, ffn:]
    expected = silu_mul_torch(gate_up)
    _close(expected, gate / (1 + torch.exp(-gate)) * up, dtype)
    out = silu_mul(gate_up)
    assert out.dtype == dtype and out.shape == (3, ffn)
    _close(out, expected, dtype)


def test_elementwise_torch_paths_in_float64():
    """A float64 model stays float64 where HF computes in float64 (SwiGLU; rotary in
    test_fused_rotary_kv_write.py); RMSNorm normalizes in float32 as HF does."""
    gen = _gen(45)
    x = _randn(gen, 4, 32, dtype=torch.float64)
    weight = 1 + _randn(gen, 32, dtype=torch.float64) * 0.1
    torch.testing.assert_close(rmsnorm_torch(x, weight, 1e-6), _hf_rmsnorm(x, weight, 1e-6), rtol=0, atol=0)
    gate_up = _randn(gen, 4, 64, dtype=torch.float64)
    gate, up = gate_up[:, :32], gate_up[:, 32:]
    torch.testing.assert_close(silu_mul_torch(gate_up), gate / (1 + torch.exp(-gate)) * up, rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------- attention


def _kv_setup(gen, kv_lens, num_kv_heads, head_dim, dtype, spare_rows=2, spare_slots=23):
    """A KV cache whose slots are handed out in shuffled order, and a req_to_token table whose rows
    are used out of order, so that the kernels must really follow the indirection."""
    device = gen.device
    num_slots = sum(kv_lens) + spare_slots
    max_ctx = max(kv_lens) + 5
    k_cache = _randn(gen, num_slots, num_kv_heads, head_dim, dtype=dtype)
    v_cache = _randn(gen, num_slots, num_kv_heads, head_dim, dtype=dtype)
    num_rows = len(kv_lens) + spare_rows
    req_to_token = torch.randint(0, num_slots, (num_rows, max_ctx), generator=gen, device=device,
                                 dtype=torch.int32)
    req_rows = torch.randperm(num_rows, generator=gen, device=device)[:len(kv_lens)]
    free = torch.randperm(num_slots, generator=gen, device=device)
    used = 0
    for row, kv_len in zip(req_rows.tolist(), kv_lens):
        req_to_token[row, :kv_len] = free[used:used + kv_len].int()
        used += kv_len
    return k_cache, v_cache, req_to_token, req_rows


def _naive_attention(q, k_cache, v_cache, req_to_token, req_rows, q_starts, kv_lens, scale):
    """Explicit softmax over a dense causal score matrix, one (request, q head) at a time."""
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(len(kv_lens)):
        start, end, kv_len = int(q_starts[b]), int(q_starts[b + 1]), int(kv_lens[b])
        q_len = end - start
        if kv_len == 0:
            continue
        slots = [int(req_to_token[int(req_rows[b]), p]) for p in range(kv_len)]
        for h in range(num_q_heads):
            kv_head = h * num_kv_heads // num_q_heads
            keys = torch.stack([k_cache[s, kv_head] for s in slots]).double()
            values = torch.stack([v_cache[s, kv_head] for s in slots]).double()
            scores = q[start:end, h].double() @ keys.T * scale
            query_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
            scores[torch.arange(kv_len)[None, :] > query_pos] = float("-inf")
            out[start:end, h] = torch.softmax(scores, dim=-1) @ values
    return out


# The torch paths keep float64 (the engine's exactness tests against HF run in float64).
NAIVE_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", NAIVE_TOL)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 4, 32), (9, 3, 16)])
def test_decode_attention_torch_matches_naive(dtype, num_q_heads, num_kv_heads, head_dim):
    gen = _gen(60 + num_q_heads)
    kv_lens = [1, 37, 70, 0]
    k_cache, v_cache, req_to_token, req_rows = _kv_setup(gen, kv_lens, num_kv_heads, head_dim, dtype)
    q = _randn(gen, len(kv_lens), num_q_heads, head_dim, dtype=dtype)
    lens = torch.tensor(kv_lens)
    scale = 1 / math.sqrt(head_dim)
    out = decode_attention_torch(q, k_cache, v_cache, req_to_token, req_rows, lens, scale)
    naive = _naive_attention(q, k_cache, v_cache, req_to_token, req_rows, torch.arange(len(kv_lens) + 1),
                             lens, scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), naive, rtol=NAIVE_TOL[dtype], atol=NAIVE_TOL[dtype])


# (q heads, kv heads, head dim, kv_lens, num_splits): GQA 1 and 3; contexts of 1, of exactly one
# KV block (64), not a multiple of it, and 0 (a padded batch row); one split, several, and more
# splits than a context has blocks (empty splits).
DECODE_CASES = [
    (4, 4, 32, [1, 64, 100], 1),
    (9, 3, 16, [37, 1, 130], 3),
    (9, 3, 32, [5, 0, 99, 64], None),
    (8, 2, 64, [100], 5),
]


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_attention(dtype, case):
    num_q_heads, num_kv_heads, head_dim, kv_lens, num_splits = DECODE_CASES[case]
    gen = _gen(70 + 10 * case + ATTENTION_DTYPES.index(dtype))
    k_cache, v_cache, req_to_token, req_rows = _kv_setup(gen, kv_lens, num_kv_heads, head_dim, dtype)
    batch = len(kv_lens)
    # q as a strided view of a fused qkv output.
    _, q, _, _ = _fused_qkv(gen, batch, num_q_heads, num_kv_heads, head_dim, dtype)
    lens = torch.tensor(kv_lens, dtype=torch.int32 if case % 2 else torch.int64)
    scale = 1 / math.sqrt(head_dim)
    expected = decode_attention_torch(q, k_cache, v_cache, req_to_token, req_rows, lens, scale)

    kwargs = {}
    if num_splits is not None:
        workspace = torch.full((decode_workspace_numel(batch, num_q_heads, head_dim, num_splits) + 7,),
                               float("nan"))
        kwargs = dict(max_kv_len=max(kv_lens), num_splits=num_splits, workspace=workspace)
    out = decode_attention(q, k_cache, v_cache, req_to_token, req_rows, lens, scale, **kwargs)
    assert out.dtype == dtype and out.shape == (batch, num_q_heads, head_dim)
    _close(out, expected, dtype)
    assert not out.isnan().any()


CPU_ATTENTION_TOL = {**TOL, torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_attention_cpu_matches_the_twin(dtype, case):
    """The CPU path's fused attention against the twin, into the decode rows of a step's output."""
    from lightllm_nb.kernels import decode_attention_cpu

    num_q_heads, num_kv_heads, head_dim, kv_lens, _ = DECODE_CASES[case]
    gen = _gen(170 + 10 * case)
    k_cache, v_cache, req_to_token, req_rows = _kv_setup(gen, kv_lens, num_kv_heads, head_dim, dtype)
    batch = len(kv_lens)
    _, q, _, _ = _fused_qkv(gen, batch, num_q_heads, num_kv_heads, head_dim, dtype)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    scale = 1 / math.sqrt(head_dim)
    expected = decode_attention_torch(q, k_cache, v_cache, req_to_token, req_rows, lens, scale)
    step_out = torch.full((batch + 2, num_q_heads, head_dim), float("nan"), dtype=dtype)
    out = decode_attention_cpu(q, k_cache, v_cache, req_to_token, req_rows, lens, scale,
                               max_kv_len=max(kv_lens), out=step_out[:batch])
    assert out.data_ptr() == step_out.data_ptr()
    torch.testing.assert_close(out.double(), expected.double(), **CPU_ATTENTION_TOL[dtype])
    assert step_out[batch:].isnan().all()


@pytest.mark.parametrize("one_thread_elements", [0, 1 << 20])
def test_decode_attention_cpu_on_either_thread_count_leaves_torchs_count(monkeypatch, one_thread_elements):
    """Small attention runs on the calling thread alone and gives torch its thread count back; larger
    attention keeps torch's threads (the threshold lowered to 0 takes that path here); same results."""
    # The package re-exports the function under the module's name: fetch the module itself.
    module = importlib.import_module("lightllm_nb.kernels.decode_attention_cpu")
    monkeypatch.setattr(module, "ONE_THREAD_ELEMENTS", one_thread_elements)
    threads_inside = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        threads_inside.append(torch.get_num_threads())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    num_q_heads, num_kv_heads, head_dim, kv_lens, _ = DECODE_CASES[1]
    gen = _gen(190)
    k_cache, v_cache, req_to_token, req_rows = _kv_setup(gen, kv_lens, num_kv_heads, head_dim, torch.float64)
    _, q, _, _ = _fused_qkv(gen, len(kv_lens), num_q_heads, num_kv_heads, head_dim, torch.float64)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    args = (q, k_cache, v_cache, req_to_token, req_rows, lens, 1 / math.sqrt(head_dim))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = module.decode_attention_cpu(*args, max_kv_len=max(kv_lens))
        assert torch.get_num_threads() == 2
        assert threads_inside == [1 if one_thread_elements else 2]
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, decode_attention_torch(*args), **CPU_ATTENTION_TOL[torch.float64])


@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_attention_writes_into_out(case):
    """Into the decode rows of a step's output, as the model passes them; with several splits the
    last split of each (request, kv head) merges, and leaves its counter zero for the next layer."""
    num_q_heads, num_kv_heads, head_dim, kv_lens, num_splits = DECODE_CASES[case]
    dtype = torch.float32
    gen = _gen(170 + case)
    k_cache, v_cache, req_to_token, req_rows = _kv_setup(gen, kv_lens, num_kv_heads, head_dim, dtype)
    batch = len(kv_lens)
    _, q, _, _ = _fused_qkv(gen, batch, num_q_heads, num_kv_heads, head_dim, dtype)
    lens = torch.tensor(kv_lens)
    args = (q, k_cache, v_cache, req_to_token, req_rows, lens, 1 / math.sqrt(head_dim))
    expected = decode_attention_torch(*args)
    counters = torch.zeros(batch * num_kv_heads + 3, dtype=torch.int32)
    for fn in (decode_attention_torch, decode_attention, decode_attention):  # twice: counters reused
        step_out = torch.full((batch + 3, num_q_heads, head_dim), float("nan"))
        returned = fn(*args, max_kv_len=max(kv_lens), num_splits=num_splits, split_counters=counters,
                      out=step_out[1:batch + 1])
        assert returned.data_ptr() == step_out[1].data_ptr()
        _close(step_out[1:batch + 1], expected, dtype)
        assert step_out[0].isnan().all() and step_out[batch + 1:].isnan().all()  # nothing written outside
        assert not counters.any()
    with pytest.raises(ValueError, match="out must be"):
        decode_attention(*args, out=step_out[:batch].transpose(1, 2))
    with pytest.raises(ValueError, match="split_counters must be"):
        decode_attention(*args, num_splits=2, split_counters=counters[:1])


@pytest.mark.parametrize("dtype", NAIVE_TOL)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 4, 16), (9, 3, 32)])
def test_prefill_attention_torch_matches_naive(dtype, num_q_heads, num_kv_heads, head_dim):
    gen = _gen(90 + num_q_heads)
    q_lens, kv_lens = [1, 20, 1, 13], [1, 20, 45, 30]  # a 1-token prompt, a fresh prompt, a decode row, a prefix hit
    k_cache, v_cache, req_to_token, req_rows = _kv_setup(gen, kv_lens, num_kv_heads, head_dim, dtype)
    q_starts = torch.tensor([0] + q_lens).cumsum(0).int()
    q = _randn(gen, sum(q_lens), num_q_heads, head_dim, dtype=dtype)
    lens = torch.tensor(kv_lens)
    scale = 1 / math.sqrt(head_dim)
    out = prefill_attention_torch(q, k_cache, v_cache, req_to_token, req_rows, q_starts, lens, scale)
    naive = _naive_attention(q, k_cache, v_cache, req_to_token, req_rows, q_starts, lens, scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), naive, rtol=NAIVE_TOL[dtype], atol=NAIVE_TOL[dtype])
    # A q_len = 1 row is exactly a decode step.
    token = int(q_starts[2])
    decode = decode_attention_torch(q[token:token + 1], k_cache, v_cache, req_to_token, req_rows[2:3],
                                    lens[2:3], scale)
    torch.testing.assert_close(out[token:token + 1], decode, rtol=NAIVE_TOL[dtype], atol=NAIVE_TOL[dtype])


# (q heads, kv heads, head dim, q_lens, kv_lens): GQA 1 and 3; fresh prompts longer than one
# q block (64); cached prefixes; q_len = 1 rows; lengths not multiples of the block sizes; a
# head dim short of its power of two (the loads of keys every row sees are masked then) with
# several such key blocks before the diagonal, and a cached prefix ending 4 keys short of a key
# block (the keys every row of a q block sees stop at that block's start, not at the next one).
PREFILL_CASES = [
    (4, 4, 32, [70], [70]),
    (9, 3, 16, [1, 30, 5], [1, 30, 50]),
    (9, 3, 32, [20, 1, 66], [93, 77, 100]),
    (4, 2, 24, [150, 12], [150, 200]),
]


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_prefill_attention(dtype, case):
    num_q_heads, num_kv_heads, head_dim, q_lens, kv_lens = PREFILL_CASES[case]
    gen = _gen(100 + 10 * case + ATTENTION_DTYPES.index(dtype))
    k_cache, v_cache, req_to_token, req_rows = _kv_setup(gen, kv_lens, num_kv_heads, head_dim, dtype)
    _, q, _, _ = _fused_qkv(gen, sum(q_lens), num_q_heads, num_kv_heads, head_dim, dtype)
    q_starts = torch.tensor([0] + q_lens).cumsum(0).int()
    lens = torch.tensor(kv_lens, dtype=torch.int32 if case % 2 else torch.int64)
    scale = 1 / math.sqrt(head_dim)
    expected = prefill_attention_torch(q, k_cache, v_cache, req_to_token, req_rows, q_starts, lens, scale)
    max_q_len = max(q_lens) if case % 2 else None
    out = prefill_attention(q, k_cache, v_cache, req_to_token, req_rows, q_starts, lens, scale, max_q_len)
    assert out.dtype == dtype and out.shape == q.shape
    _close(out, expected, dtype)
    # Into the prefill rows of a step's output (decode rows first), nothing written outside them.
    step_out = torch.full((2 + q.shape[0],) + q.shape[1:], float("nan"), dtype=dtype)
    prefill_attention(q, k_cache, v_cache, req_to_token, req_rows, q_starts, lens, scale, max_q_len,
                      out=step_out[2:])
    _close(step_out[2:], expected, dtype)
    assert step_out[:2].isnan().all()


# ---------------------------------------------------------------- packed CPU projections


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 16, 67])
def test_packed_linear_matches_f_linear(dtype, rows):
    from lightllm_nb.models.packed_linear import can_pack, pack, packed_linear

    gen = _gen(rows)
    weight, bias = _randn(gen, 96, 80, dtype=dtype), _randn(gen, 96, dtype=dtype)
    assert can_pack(weight)
    packed = pack(weight)
    # A strided view, as a slice of a wider activation would be.
    x = _randn(gen, rows, 160, dtype=dtype)[:, ::2]
    expected = torch.nn.functional.linear(x, weight, bias)
    _close(packed_linear(x, packed, bias), expected, dtype)
    _close(packed_linear(x, packed), torch.nn.functional.linear(x, weight), dtype)


def test_float64_weights_are_not_packed():
    from lightllm_nb.models.packed_linear import can_pack

    assert not can_pack(torch.zeros(4, 4, dtype=torch.float64))
