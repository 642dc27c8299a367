"""Rotary fused with the KV-cache write (kernels/rotary_kv_write.py): the torch twin against HF's
rotary formula, the kernel against the twin, on fresh random inputs (Triton's interpreter on the
CPU; real shapes in test_kernels_gpu.py)."""

import pytest
import torch

from lightllm_nb.kernels import rotary_kv_write, rotary_kv_write_torch
# pytest puts tests/ on sys.path, so the kernel tests' input builders are shared, not copied.
from test_kernels import DTYPES, _close, _fused_qkv, _gen, _hf_rotary, _rope_tables


def _inputs(seed, dtype, num_q_heads, num_kv_heads, head_dim, tokens=7, num_slots=40, max_pos=200):
    gen = _gen(seed)
    cos, sin = _rope_tables(max_pos, head_dim)
    _, q, k, v = _fused_qkv(gen, tokens, num_q_heads, num_kv_heads, head_dim, dtype)
    positions = torch.randperm(max_pos, generator=gen)[:tokens]
    slots = torch.randperm(num_slots, generator=gen)[:tokens]
    return q, k, v, positions, cos, sin, slots, num_slots


def _run(fn, q, k, v, positions, cos, sin, slots, num_slots, cache_dtype):
    """fn on copies of q (rotated in place) and NaN-filled caches: (q, k_cache, v_cache)."""
    q = q.clone()
    k_cache = torch.full((num_slots,) + k.shape[1:], float("nan"), dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    fn(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    return q, k_cache, v_cache


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 4, 16), (9, 3, 32)])
def test_torch_twin_matches_hf_rotary(dtype, num_q_heads, num_kv_heads, head_dim):
    q, k, v, positions, cos, sin, slots, num_slots = _inputs(200 + head_dim, dtype, num_q_heads, num_kv_heads, head_dim)
    k_before = k.clone()
    q_out, k_cache, v_cache = _run(rotary_kv_write_torch, q, k, v, positions, cos, sin, slots, num_slots, dtype)
    exact = dict(rtol=1e-14, atol=1e-14)  # float64 stays float64, as HF computes it
    check = (lambda a, b: torch.testing.assert_close(a, b, **exact)) if dtype == torch.float64 else \
        (lambda a, b: _close(a, b, dtype))
    check(q_out, _hf_rotary(q, positions, cos, sin))
    check(k_cache[slots], _hf_rotary(k, positions, cos, sin))
    torch.testing.assert_close(v_cache[slots], v, rtol=0, atol=0)
    torch.testing.assert_close(k, k_before, rtol=0, atol=0)  # k itself is not rotated
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 4, 16), (9, 3, 32)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_kernel_matches_torch_twin(dtype, num_q_heads, num_kv_heads, head_dim, slot_dtype):
    q, k, v, positions, cos, sin, slots, num_slots = _inputs(
        210 + DTYPES.index(dtype) + head_dim, dtype, num_q_heads, num_kv_heads, head_dim)
    slots = slots.to(slot_dtype)
    qkv_before = (q.clone(), k.clone(), v.clone())
    expected = _run(rotary_kv_write_torch, q, k, v, positions, cos, sin, slots, num_slots, dtype)
    q_out, k_cache, v_cache = _run(rotary_kv_write, q, k, v, positions, cos, sin, slots, num_slots, dtype)
    _close(q_out, expected[0], dtype)
    _close(k_cache.nan_to_num(7.0), expected[1].nan_to_num(7.0), dtype)  # slots outside stay NaN
    torch.testing.assert_close(v_cache, expected[2], rtol=0, atol=0, equal_nan=True)
    # Only q is rotated in place: k and v (its neighbours in the fused qkv row) are unchanged.
    torch.testing.assert_close((k, v), qkv_before[1:], rtol=0, atol=0)


def test_says_what_layout_it_needs():
    q, k, v, positions, cos, sin, slots, num_slots = _inputs(230, torch.float32, 4, 2, 16)
    k_cache = torch.zeros(num_slots, 2, 16)
    with pytest.raises(ValueError, match="contiguous head dim"):
        rotary_kv_write(q, k, v, positions, cos, sin, k_cache.transpose(1, 2).contiguous().transpose(1, 2),
                        k_cache.clone(), slots)
    with pytest.raises(ValueError, match="cos and sin"):
        rotary_kv_write(q, k, v, positions, cos, sin.double(), k_cache, k_cache.clone(), slots)
