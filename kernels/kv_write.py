"""Scatter this step's K and V rows into one layer's token-slot KV buffers."""

import triton
import triton.language as tl


@triton.jit
def _copy_token(src_ptr, stride_t, stride_h, dst_ptr, stride_s, stride_dh, token, slot, num_heads,
                HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    row = tl.load(src_ptr + token * stride_t + offs_h[:, None] * stride_h + offs_d[None, :], mask=mask)
    tl.store(dst_ptr + slot * stride_s + offs_h[:, None] * stride_dh + offs_d[None, :],
             row.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_write_kernel(
    k_cache_ptr, v_cache_ptr, k_ptr, v_ptr, slots_ptr,
    stride_kcs, stride_kch, stride_vcs, stride_vch,
    stride_kt, stride_kh, stride_vt, stride_vh,
    num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    # 64-bit: slot * stride passes 2^31 elements on large cards.
    slot = tl.load(slots_ptr + token).to(tl.int64)
    _copy_token(k_ptr, stride_kt, stride_kh, k_cache_ptr, stride_kcs, stride_kch, token, slot, num_heads,
                HEAD_DIM, BLOCK_H, BLOCK_D)
    _copy_token(v_ptr, stride_vt, stride_vh, v_cache_ptr, stride_vcs, stride_vch, token, slot, num_heads,
                HEAD_DIM, BLOCK_H, BLOCK_D)


def write_kv(k_cache, v_cache, k, v, slots):
    """k_cache/v_cache [S, Hkv, D][slots[t]] = k/v [T, Hkv, D][t]; slots [T] int32 or int64."""
    tokens, num_heads, head_dim = k.shape
    if any(t.stride(2) != 1 for t in (k_cache, v_cache, k, v)):
        raise ValueError("KV caches and k/v need a contiguous head dim (strided rows and heads are fine)")
    if tokens == 0:
        return
    _kv_write_kernel[(tokens,)](
        k_cache, v_cache, k, v, slots,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        num_heads,
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def write_kv_torch(k_cache, v_cache, k, v, slots):
    """Torch path of write_kv: same signature and semantics."""
    index = slots.long()
    k_cache[index] = k.to(k_cache.dtype)
    v_cache[index] = v.to(v_cache.dtype)
