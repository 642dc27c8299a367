"""Rotary position embedding, applied in place to q and k (HF "rotate_half" / NeoX convention).

q and k are usually column slices of one fused qkv projection, so rows are strided; only the
head dim must be contiguous.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, num_heads, token, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    row = x_ptr + token * stride_t
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + offs_h
        mask = (heads < num_heads)[:, None] & (offs_d < HALF)[None, :]
        first = row + heads[:, None] * stride_h + offs_d[None, :]
        x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_table,
    num_q_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # One program per token: the cos/sin row is loaded once and shared by all q and k heads.
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_table + offs_d, mask=mask_d, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_table + offs_d, mask=mask_d, other=0.0)[None, :]
    _rotate_heads(q_ptr, stride_qt, stride_qh, num_q_heads, token, cos, sin, HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr, stride_kt, stride_kh, num_kv_heads, token, cos, sin, HALF, BLOCK_H, BLOCK_HALF)


def apply_rotary(q, k, positions, cos, sin):
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by cos/sin [max_pos, D//2] rows at positions [T]."""
    tokens, num_q_heads, head_dim = q.shape
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k need a contiguous head dim (strided rows and heads are fine)")
    if cos.dtype != sin.dtype or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError("cos and sin must be [max_pos, head_dim // 2] tables of the same dtype and layout")
    if tokens == 0:
        return
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(num_q_heads, k.shape[1])), max(1, 4096 // block_half))
    _rotary_kernel[(tokens,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        num_q_heads, k.shape[1],
        HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half,
    )


def apply_rotary_torch(q, k, positions, cos, sin):
    """Torch path of apply_rotary: same signature, rotates q and k in place."""
    half = q.shape[-1] // 2
    # float32 at least; a float64 model (the exactness tests against HF) keeps float64.
    compute = torch.promote_types(q.dtype, torch.float32)
    c = cos[positions].to(compute).unsqueeze(1)
    s = sin[positions].to(compute).unsqueeze(1)
    for x in (q, k):
        x1, x2 = x[..., :half].to(compute), x[..., half:].to(compute)
        # Both halves are computed before either is written: .to() may alias x.
        out1, out2 = x1 * c - x2 * s, x2 * c + x1 * s
        x[..., :half].copy_(out1)
        x[..., half:].copy_(out2)
