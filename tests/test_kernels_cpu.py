"""The CPU path's kernels (kernels/*_cpu.py) against their twins, the oracles, on fresh random inputs:
the same bits where the twin's own expressions are computed, float32 and float64 (the exactness
tests' dtype) and bfloat16; attention within tolerance: prefill, and the gather plan decode attention
keeps across a step's layers (its single-call tests are in test_kernels.py)."""

import importlib
import math

import pytest
import torch

from lightllm_nb.kernels import (DecodeAttentionCPU, add_rmsnorm_cpu, add_rmsnorm_torch, decode_attention_cpu,
                                 decode_attention_torch, prefill_attention_cpu, prefill_attention_torch, rmsnorm_cpu,
                                 rmsnorm_torch, rotary_kv_write_cpu, rotary_kv_write_torch, silu_mul_cpu,
                                 silu_mul_torch)
from lightllm_nb.models.kernel_set import kernels_for
# pytest puts tests/ on sys.path, so the kernel tests' input builders are shared, not copied.
from test_fused_rotary_kv_write import _inputs, _run
from test_kernels import CPU_ATTENTION_TOL, PREFILL_CASES, _fused_qkv, _gen, _kv_setup, _randn

# (q heads, kv heads, head dim, chunk lengths, context lengths): test_kernels' cases, and a step of
# many chunks, one of them empty and one a single token.
CPU_PREFILL_CASES = PREFILL_CASES + [(9, 3, 64, [44, 0, 37, 1, 12, 30], [44, 20, 90, 60, 12, 31])]

CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
SEEDS = range(3)


def _same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_rmsnorm_cpu_is_the_twin_bit_for_bit(dtype, seed):
    gen = _gen(500 + seed)
    hidden = [576, 40, 2048][seed]
    x = _randn(gen, 1 + 7 * seed, hidden, dtype=dtype) * 3
    weight = 1 + _randn(gen, hidden, dtype=dtype) * 0.1
    out = rmsnorm_cpu(x, weight, 1e-5)
    assert out.dtype == dtype
    _same(out, rmsnorm_torch(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_add_rmsnorm_cpu_is_the_twin_bit_for_bit(dtype, seed):
    gen = _gen(510 + seed)
    x = _randn(gen, 5 + seed, 576, dtype=dtype)
    residual = _randn(gen, 5 + seed, 576, dtype=dtype) * 2
    weight = 1 + _randn(gen, 576, dtype=dtype) * 0.1
    expected_residual = residual.clone()
    expected = add_rmsnorm_torch(x, expected_residual, weight, 1e-6)[0]
    out, returned = add_rmsnorm_cpu(x, residual, weight, 1e-6)
    assert returned is residual
    _same(residual, expected_residual)
    _same(out, expected)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_silu_mul_cpu_is_the_twin_bit_for_bit(dtype, seed):
    gen = _gen(520 + seed)
    gate_up = _randn(gen, 1 + 5 * seed, 2 * [1536, 1030, 8][seed], dtype=dtype) * 2
    before = gate_up.clone()
    out = silu_mul_cpu(gate_up)
    assert out.dtype == dtype
    _same(out, silu_mul_torch(gate_up))
    _same(gate_up, before)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (8, 2, 32)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_rotary_kv_write_cpu_is_the_twin_bit_for_bit(dtype, num_q_heads, num_kv_heads, head_dim, slot_dtype):
    """q and k as neighbouring slices of one qkv row, as the model passes them (the joint rotation)."""
    q, k, v, positions, cos, sin, slots, num_slots = _inputs(
        530 + head_dim + num_q_heads, dtype, num_q_heads, num_kv_heads, head_dim)
    slots = slots.to(slot_dtype)
    k_before, v_before = k.clone(), v.clone()
    expected = _run(rotary_kv_write_torch, q, k, v, positions, cos, sin, slots, num_slots, dtype)
    out = _run(rotary_kv_write_cpu, q, k, v, positions, cos, sin, slots, num_slots, dtype)
    for actual, wanted in zip(out, expected):
        _same(actual, wanted)  # the caches' untouched slots stay NaN in both
    _same(k, k_before)  # k itself is not rotated, nor is v touched
    _same(v, v_before)


def test_rotary_kv_write_cpu_on_separate_tensors():
    """q and k that are not slices of one row (a caller's own tensors) still get the twin's result."""
    q, k, v, positions, cos, sin, slots, num_slots = _inputs(560, torch.float32, 9, 3, 64)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    expected = _run(rotary_kv_write_torch, q, k, v, positions, cos, sin, slots, num_slots, torch.float32)
    for actual, wanted in zip(_run(rotary_kv_write_cpu, q, k, v, positions, cos, sin, slots, num_slots,
                                   torch.float32), expected):
        _same(actual, wanted)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_decode_attention_keeps_a_plan_only_while_its_inputs_stand(dtype):
    """Layers of one step (other caches, other q) reuse the plan; new rows or lengths, a longer
    context, or req_to_token written in place (the next step) each give the twin's result again."""
    kv_lens = [5, 0, 17, 33, 9]
    gen = _gen(600 + CPU_DTYPES.index(dtype))
    k_cache, v_cache, req_to_token, req_rows = _kv_setup(gen, kv_lens, 3, 16, dtype)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    scale = 1 / math.sqrt(16)
    attention = DecodeAttentionCPU()

    def check(k_cache, v_cache, req_rows, lens, longest):
        _, q, _, _ = _fused_qkv(gen, len(lens), 9, 3, 16, dtype)
        out = attention(q, k_cache, v_cache, req_to_token, req_rows, lens, scale, max_kv_len=longest)
        expected = decode_attention_torch(q, k_cache, v_cache, req_to_token, req_rows, lens, scale)
        torch.testing.assert_close(out.double(), expected.double(), **CPU_ATTENTION_TOL[dtype])

    check(k_cache, v_cache, req_rows, lens, 33)
    plan = attention._plan
    check(_randn(gen, *k_cache.shape, dtype=dtype), _randn(gen, *v_cache.shape, dtype=dtype), req_rows, lens, 33)
    assert attention._plan is plan  # the next layer of the same step
    check(k_cache, v_cache, req_rows, lens + 1, 34)  # the step after: one more token each
    check(k_cache, v_cache, req_rows.flip(0), lens.flip(0), 34)  # other rows, in a new tensor
    lens_in_place = lens.clone()
    check(k_cache, v_cache, req_rows, lens_in_place, 33)
    lens_in_place[2] = 4  # written in place, same tensor
    check(k_cache, v_cache, req_rows, lens_in_place, 33)
    # A row remapped in place to other slots (not a reordering: attention is blind to key order).
    req_to_token[req_rows[3], :33] = (req_to_token[req_rows[3], :33] + 1) % k_cache.shape[0]
    check(k_cache, v_cache, req_rows, lens_in_place, 33)
    rows_in_place = req_rows.clone()
    check(k_cache, v_cache, rows_in_place, lens_in_place, 33)
    rows_in_place[[0, 3]] = rows_in_place[[3, 0]]  # two rows swapped in place, same tensor
    check(k_cache, v_cache, rows_in_place, lens_in_place, 33)
    assert attention._plan is not plan
    # The rows' own longest context, whatever longer one the caller names (a mixed step's prefill).
    check(k_cache, v_cache, req_rows, lens_in_place, 4000)
    assert attention._plan.slots.numel() == len(kv_lens) * int(lens_in_place.max())


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_decode_attention_takes_inference_tensors(dtype):
    """An engine made under torch.inference_mode hands in tensors with no version counter: no plan
    is kept for them, and the results are still the twin's."""
    kv_lens = [5, 0, 17]
    gen = _gen(650 + CPU_DTYPES.index(dtype))
    with torch.inference_mode():
        k_cache, v_cache, req_to_token, req_rows = _kv_setup(gen, kv_lens, 3, 16, dtype)
        lens = torch.tensor(kv_lens, dtype=torch.int32)
        _, q, _, _ = _fused_qkv(gen, len(kv_lens), 9, 3, 16, dtype)
        expected = decode_attention_torch(q, k_cache, v_cache, req_to_token, req_rows, lens, 0.25)
        attention = DecodeAttentionCPU()
        for attend in (attention, decode_attention_cpu):
            out = attend(q, k_cache, v_cache, req_to_token, req_rows, lens, 0.25)
            torch.testing.assert_close(out.double(), expected.double(), **CPU_ATTENTION_TOL[dtype])
        assert attention._plan is None


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", range(len(CPU_PREFILL_CASES)))
@pytest.mark.parametrize("padded_limit", [None, 0])
def test_prefill_attention_cpu_matches_the_twin(monkeypatch, dtype, case, padded_limit):
    """Into the prefill rows of a step's output (decode rows first), nothing written outside them;
    padded_limit 0 takes the twin's path, as a step too large to pad does."""
    if padded_limit is not None:
        module = importlib.import_module("lightllm_nb.kernels.prefill_attention_cpu")
        monkeypatch.setattr(module, "PADDED_MASK_ELEMENTS", padded_limit)
    heads, kv_heads, head_dim, chunks, contexts = CPU_PREFILL_CASES[case]
    gen = _gen(700 + 10 * case + CPU_DTYPES.index(dtype))
    cache_args = _kv_setup(gen, contexts, kv_heads, head_dim, dtype)  # k_cache, v_cache, req_to_token, req_rows
    q = _fused_qkv(gen, sum(chunks), heads, kv_heads, head_dim, dtype)[1]
    args = (q, *cache_args, torch.tensor([0] + chunks).cumsum(0).int(),
            torch.tensor(contexts, dtype=(torch.int64, torch.int32)[case % 2]), head_dim ** -0.5)
    expected = prefill_attention_torch(*args)
    step_out = torch.full((2 + q.shape[0],) + q.shape[1:], float("nan"), dtype=dtype)
    out = prefill_attention_cpu(*args, max(chunks) if case % 2 else None, out=step_out[2:])
    assert out.data_ptr() == step_out[2:].data_ptr()
    torch.testing.assert_close(out.double(), expected.double(), **CPU_ATTENTION_TOL[dtype])
    assert step_out[:2].isnan().all()


def test_the_cpu_kernel_set_uses_them():
    kernels = kernels_for(torch.device("cpu"))
    assert (kernels.rmsnorm, kernels.add_rmsnorm, kernels.rotary_kv_write, kernels.silu_mul) == (
        rmsnorm_cpu, add_rmsnorm_cpu, rotary_kv_write_cpu, silu_mul_cpu)
    assert isinstance(kernels.decode_attention, DecodeAttentionCPU)
    assert kernels.prefill_attention is prefill_attention_cpu
    assert kernels_for(torch.device("cpu")).decode_attention is not kernels.decode_attention  # one per model
