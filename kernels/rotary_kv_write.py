"""Rotary position embedding on q and k, fused with the write of k and v into the KV cache.

One program per token loads its cos/sin row once, rotates q in place (HF "rotate_half" / NeoX
convention) and stores the rotated k and the plain v straight into the token's cache slot: one
launch and one pass over k where rotary and then a cache scatter took two. Nothing reads k after
its slot is written (attention reads the cache), so k itself is left unrotated.

q, k and v are usually column slices of one fused qkv projection, so rows are strided; only the
head dim must be contiguous.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .dependent_launch import dependent_launch


@triton.jit
def _rotate_heads(src_row, stride_src_h, dst_row, stride_dst_h, num_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + offs_h
        mask = (heads < num_heads)[:, None] & (offs_d < HALF)[None, :]
        src = src_row + heads[:, None] * stride_src_h + offs_d[None, :]
        dst = dst_row + heads[:, None] * stride_dst_h + offs_d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        # Both halves are loaded before either is stored: for q, src and dst are the same row.
        tl.store(dst, (x1 * cos - x2 * sin).to(dst_row.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dst_row.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_table,
    stride_kcs, stride_kch, stride_vcs, stride_vch,
    num_q_heads, num_kv_heads,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_KV_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # q, k and v come from the kernel before this one
        gdc_launch_dependents()
        gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    # 64-bit: slot * stride passes 2^31 elements on large cards.
    slot = tl.load(slots_ptr + token).to(tl.int64)
    offs_half = tl.arange(0, BLOCK_HALF)
    mask_half = offs_half < HALF
    cos = tl.load(cos_ptr + pos * stride_table + offs_half, mask=mask_half, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_table + offs_half, mask=mask_half, other=0.0)[None, :]
    q_row = q_ptr + token * stride_qt
    _rotate_heads(q_row, stride_qh, q_row, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, k_cache_ptr + slot * stride_kcs, stride_kch,
                  num_kv_heads, cos, sin, HALF, BLOCK_H, BLOCK_HALF)
    offs_h = tl.arange(0, BLOCK_KV_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(v_cache_ptr + slot * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_kv_write(q, k, v, positions, cos, sin, k_cache, v_cache, slots, pdl=False):
    """Rotate q [T, Hq, D] in place and write rotated k and v [T, Hkv, D] to k_cache/v_cache
    [S, Hkv, D] at slots [T] (int32 or int64), by cos/sin [max_pos, D//2] rows at positions [T].
    k is not changed. pdl: programmatic dependent launch where the card has it
    (kernels/dependent_launch.py)."""
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if any(t.stride(-1) != 1 for t in (q, k, v, k_cache, v_cache)):
        raise ValueError("q, k, v and the KV caches need a contiguous head dim (strided rows and heads are fine)")
    if cos.dtype != sin.dtype or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError("cos and sin must be [max_pos, head_dim // 2] tables of the same dtype and layout")
    if tokens == 0:
        return
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(num_q_heads, num_kv_heads)), max(1, 4096 // block_half))
    pdl = dependent_launch(pdl, q)
    _rotary_kv_write_kernel[(tokens,)](
        q, k, v, positions, cos, sin, slots, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        num_q_heads, num_kv_heads,
        HEAD_DIM=head_dim, HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half,
        BLOCK_KV_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        PDL=pdl, launch_pdl=pdl,
    )


def rotary_kv_write_torch(q, k, v, positions, cos, sin, k_cache, v_cache, slots):
    """Torch path of rotary_kv_write: same signature and semantics."""
    half = q.shape[-1] // 2
    # float32 at least; a float64 model (the exactness tests against HF) keeps float64.
    compute = torch.promote_types(q.dtype, torch.float32)
    # index_select / index_copy_ rather than indexing: on the CPU path (this twin is the kernel there)
    # `cache[slots] = ...` forks an OpenMP region for a few KB, which waits on a sleeping worker
    # (25-44 us a write on 2 threads against 4 us), and the result is the same bits.
    positions = positions.to(cos.device, torch.long)  # index_select, unlike indexing, wants them beside cos
    c = cos.index_select(0, positions).to(compute).unsqueeze(1)
    s = sin.index_select(0, positions).to(compute).unsqueeze(1)

    def rotated(x):
        x1, x2 = x[..., :half].to(compute), x[..., half:].to(compute)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    q.copy_(rotated(q))
    index = slots.to(k_cache.device, torch.long)
    k_cache.index_copy_(0, index, rotated(k).to(k_cache.dtype))
    v_cache.index_copy_(0, index, v.to(v_cache.dtype))
