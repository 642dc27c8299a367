"""y = x @ W^T (+ bias) for a few rows of x: the decode step's projections at batch 1-4.

At M=1 a projection is a matrix-vector product: every weight byte is read once and used for one
multiply-add, so the kernel's only job is to stream W at full memory bandwidth. cuBLAS picks GEMM
tilings built for large M there (measured on an H200: 75% of copy bandwidth at batch 1). Here
each program owns BLOCK_N output columns (rows of W, contiguous in K, so loads are coalesced) and
a 1/SPLIT_K slice of K, keeps a [BLOCK_M, BLOCK_N, BLOCK_K] float32 product sum in registers and
reduces it once at the end. With SPLIT_K > 1 the slices' partial sums go to a float32 workspace
and a second launch adds them in a fixed order: deterministic, unlike atomics, so a step gives
the same tokens every time.

With swiglu=True, x is the MLP's fused gate_up output and the kernel multiplies silu(gate) * up,
computed as it loads x (rounded to x's dtype exactly as kernels/silu_mul.py stores it, so the
product is the unfused pair's): the down projection without the SiLU-mul launch before it.
"""

import torch
import triton
import triton.language as tl

from .silu_mul import silu_mul_torch

# Rows of x one launch takes; more rows and the weight tile is better spent on the tensor cores
# (cuBLAS) than on one multiply-add per byte.
GEMV_MAX_M = 4


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, stride_xm, stride_wn, stride_om, stride_os, M, N, K, k_per_split,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    col_block = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # 64-bit: N * K passes 2^31 elements for a large vocabulary projection.
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < k_end
        w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        mask_x = mask_m[:, None] & mask_k[None, :]
        if SWIGLU:  # x holds [gate | up], each K wide
            gate = tl.load(x_rows + ks[None, :], mask=mask_x, other=0.0).to(tl.float32)
            up = tl.load(x_rows + K + ks[None, :], mask=mask_x, other=0.0).to(tl.float32)
            x = (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty)
        else:
            x = tl.load(x_rows + ks[None, :], mask=mask_x, other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    total = tl.sum(acc, axis=2)
    mask = mask_m[:, None] & mask_n[None, :]
    out = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    if HAS_BIAS:  # SPLIT_K == 1 only: the reduce launch adds it otherwise
        total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_sum_kernel(part_ptr, bias_ptr, out_ptr, stride_om, M, N, splits,
                      HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    total = tl.zeros([BLOCK], tl.float32)
    for s in range(0, splits):
        total += tl.load(part_ptr + (s * M + row) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def gemv(x, weight, bias=None, *, swiglu=False, block_n=16, block_k=512, split_k=1, num_warps=4):
    """x [M, K] (M <= GEMV_MAX_M, rows may be strided) @ weight [N, K]^T + bias [N] -> [M, N] in x.dtype.

    swiglu: x is [M, 2K] = [gate | up] and silu(gate) * up takes its place. Sums in float32 in
    every dtype (no TF32). block_n, block_k, split_k and num_warps only tune speed.
    """
    m = x.shape[0]
    n, k = weight.shape
    if x.shape[1] != (2 * k if swiglu else k) or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"gemv needs x [M, {'2K' if swiglu else 'K'}] and weight [N, K] with contiguous K, got "
                         f"x {tuple(x.shape)} strides {x.stride()} and weight {tuple(weight.shape)} "
                         f"strides {weight.stride()}")
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv takes at most {GEMV_MAX_M} rows, got {m}: use a GEMM (F.linear) for larger batches")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    # Whole K blocks per split, so only a split's last block is partly masked.
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    has_bias = bias is not None
    block_m = triton.next_power_of_2(m)
    grid = (triton.cdiv(n, block_n), splits)
    if splits == 1:
        _gemv_kernel[grid](x, weight, bias if has_bias else x, out, x.stride(0), weight.stride(0), out.stride(0), 0,
                           m, n, k, k_per_split, HAS_BIAS=has_bias, SWIGLU=swiglu, BLOCK_M=block_m,
                           BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
        return out
    parts = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[grid](x, weight, x, parts, x.stride(0), weight.stride(0), n, m * n, m, n, k, k_per_split,
                       HAS_BIAS=False, SWIGLU=swiglu, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       num_warps=num_warps)
    block = 1024
    _split_sum_kernel[(m, triton.cdiv(n, block))](parts, bias if has_bias else parts, out, out.stride(0), m, n,
                                                 splits, HAS_BIAS=has_bias, BLOCK=block)
    return out


def gemv_torch(x, weight, bias=None, *, swiglu=False, **tuning):
    """Torch path of gemv: same result up to the order of the float32 sums (tuning ignored)."""
    if swiglu:
        x = silu_mul_torch(x)
    compute = torch.promote_types(x.dtype, torch.float32)  # a float64 model keeps float64
    out = x.to(compute) @ weight.to(compute).t()
    if bias is not None:
        out += bias.to(compute)
    return out.to(x.dtype)
