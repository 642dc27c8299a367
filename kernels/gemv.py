"""y = x @ W^T (+ bias) for a few rows of x: the decode step's projections at batch 1-4.

At M=1 a projection is a matrix-vector product: every weight byte is read once and used for one
multiply-add, so the kernel's only job is to stream W at full memory bandwidth. cuBLAS picks GEMM
tilings built for large M there (measured on an H200: 75% of copy bandwidth at batch 1). Here
each program owns BLOCK_N output columns (rows of W, contiguous in K, so loads are coalesced) and
a 1/SPLIT_K slice of K, keeps a [BLOCK_M, BLOCK_N, BLOCK_K] float32 product sum in registers and
reduces it once at the end. With SPLIT_K > 1 the slices' partial sums go to a float32 workspace
and each program counts itself done on its column block's counter; the last one to finish adds
the partials in split order (whichever program that is, so a step gives the same tokens every
time, unlike atomic adds of the sums) and sets the counter back to zero: one launch, no reduce
kernel after it.

With swiglu=True, x is the MLP's fused gate_up output and the kernel multiplies silu(gate) * up,
computed as it loads x (rounded to x's dtype exactly as kernels/silu_mul.py stores it, so the
product is the unfused pair's): the down projection without the SiLU-mul launch before it.

With add_rmsnorm, the column block that finishes last (a second counter) adds the finished rows
into the residual and normalizes them with kernels/rmsnorm.py's own row code: o and down
without the add_rmsnorm launch after each.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .dependent_launch import dependent_launch
from .rmsnorm import add_rmsnorm_torch, norm_row
from .silu_mul import silu_mul_torch

# Rows of x one launch takes; more rows and the weight tile is better spent on the tensor cores
# (cuBLAS) than on one multiply-add per byte.
GEMV_MAX_M = 4


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, parts_ptr, counters_ptr, stride_xm, stride_wn, stride_om,
    M, N, K, k_per_split, splits,
    residual_ptr, norm_weight_ptr, normed_ptr, stride_rm, stride_nm, eps,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, SPLIT: tl.constexpr, ADD_RMSNORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_ROW: tl.constexpr,
    PDL: tl.constexpr,
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
    if PDL:  # x comes from the kernel before this one (loading weights first compiled to a slower loop)
        gdc_launch_dependents()
        gdc_wait()
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
    tile = offs_m[:, None] * N + offs_n[None, :]  # this program's outputs in a [M, N] partial
    if SPLIT:
        tl.store(parts_ptr + split * M * N + tile, total, mask=mask)
        # Every thread's partial is stored before the count says so; the atomic releases them to
        # the program that sums and acquires the others' for it.
        tl.debug_barrier()
        finished_before = tl.atomic_add(counters_ptr + col_block, 1, sem="acq_rel", scope="gpu")
        if finished_before == splits - 1:
            tl.store(counters_ptr + col_block, 0)  # ready for the next launch (a CUDA graph replays this one)
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(0, splits):
                # .cg: the other programs' partials from L2, where their stores landed, not this SM's L1.
                total += tl.load(parts_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            _store_output(total, bias_ptr, out_ptr, stride_om, offs_m, offs_n, mask_n, mask, HAS_BIAS)
            if ADD_RMSNORM:
                _add_rmsnorm_when_last(out_ptr, counters_ptr, stride_om, M, N, residual_ptr, norm_weight_ptr,
                                       normed_ptr, stride_rm, stride_nm, eps, BLOCK_ROW)
    else:
        _store_output(total, bias_ptr, out_ptr, stride_om, offs_m, offs_n, mask_n, mask, HAS_BIAS)
        if ADD_RMSNORM:
            _add_rmsnorm_when_last(out_ptr, counters_ptr, stride_om, M, N, residual_ptr, norm_weight_ptr,
                                   normed_ptr, stride_rm, stride_nm, eps, BLOCK_ROW)


@triton.jit
def _store_output(total, bias_ptr, out_ptr, stride_om, offs_m, offs_n, mask_n, mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rmsnorm_when_last(out_ptr, counters_ptr, stride_om, M, N, residual_ptr, norm_weight_ptr, normed_ptr,
                           stride_rm, stride_nm, eps, BLOCK_ROW: tl.constexpr):
    """The column block that finishes last adds the whole output rows into the residual and
    normalizes them: the add_rmsnorm that follows the projection, without its own launch."""
    tl.debug_barrier()  # this block's outputs are stored before the count says so
    row_counter = counters_ptr + tl.num_programs(0)  # after the column blocks' split counters
    finished_before = tl.atomic_add(row_counter, 1, sem="acq_rel", scope="gpu")
    if finished_before == tl.num_programs(0) - 1:
        tl.store(row_counter, 0)
        for m in range(0, M):
            norm_row(out_ptr + m * stride_om, residual_ptr + m * stride_rm, norm_weight_ptr, normed_ptr + m * stride_nm,
                     N, eps, HAS_RESIDUAL=True, BLOCK_H=BLOCK_ROW)


def gemv(x, weight, bias=None, *, swiglu=False, add_rmsnorm=None, split_counters=None, block_n=16, block_k=512,
         split_k=1, num_warps=4, pdl=False):
    """x [M, K] (M <= GEMV_MAX_M, rows may be strided) @ weight [N, K]^T + bias [N] -> [M, N] in x.dtype.

    swiglu: x is [M, 2K] = [gate | up] and silu(gate) * up takes its place. add_rmsnorm:
    (residual [M, N], norm weight [N], eps): the product is added into residual in place and
    (rmsnorm(residual) * norm weight, residual) is returned, as kernels/rmsnorm.add_rmsnorm would
    after the projection (bit for bit when num_warps == norm_warps(N)). Sums in float32 in every
    dtype (no TF32). block_n, block_k, split_k and num_warps only tune speed. split_counters:
    optional int32 tensor of at least ceil(N / block_n) + 1 zeros, which the launch leaves zero
    again, so one tensor serves every call (without it a call that needs counters zeroes new ones).
    pdl: launch with programmatic dependent launch where the card has it (kernels/dependent_launch.py).
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
    residual, norm_weight, eps = add_rmsnorm if add_rmsnorm is not None else (out, out, 0.0)
    if residual.shape != out.shape or residual.stride(1) != 1:
        raise ValueError(f"add_rmsnorm's residual must be [{m}, {n}] with a contiguous last dim, "
                         f"got {tuple(residual.shape)} strides {residual.stride()}")
    normed = torch.empty_like(residual, memory_format=torch.contiguous_format) if add_rmsnorm is not None else out
    if m == 0:
        return (normed, residual) if add_rmsnorm is not None else out
    # Whole K blocks per split, so only a split's last block is partly masked.
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    col_blocks = triton.cdiv(n, block_n)
    parts = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    # One counter per column block for its splits, then one for the rows' add_rmsnorm.
    counters = col_blocks + 1 if add_rmsnorm is not None else col_blocks if splits > 1 else 0
    if counters == 0:
        split_counters = out  # unused
    elif split_counters is None:
        split_counters = torch.zeros(counters, dtype=torch.int32, device=x.device)
    elif split_counters.dtype != torch.int32 or split_counters.numel() < counters:
        raise ValueError(f"split_counters must be an int32 tensor of at least {counters} zeros "
                         f"(ceil(N / block_n) + 1), got {split_counters.dtype} with {split_counters.numel()}")
    pdl = dependent_launch(pdl, x)
    _gemv_kernel[(col_blocks, splits)](
        x, weight, bias if bias is not None else x, out, parts, split_counters,
        x.stride(0), weight.stride(0), out.stride(0), m, n, k, k_per_split, splits,
        residual, norm_weight, normed, residual.stride(0), normed.stride(0), eps,
        HAS_BIAS=bias is not None, SWIGLU=swiglu, SPLIT=splits > 1, ADD_RMSNORM=add_rmsnorm is not None,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_ROW=triton.next_power_of_2(n) if add_rmsnorm is not None else 1, PDL=pdl, num_warps=num_warps,
        launch_pdl=pdl)
    return (normed, residual) if add_rmsnorm is not None else out


def gemv_torch(x, weight, bias=None, *, swiglu=False, add_rmsnorm=None, **tuning):
    """Torch path of gemv: same result up to the order of the float32 sums (tuning ignored)."""
    if swiglu:
        x = silu_mul_torch(x)
    compute = torch.promote_types(x.dtype, torch.float32)  # a float64 model keeps float64
    out = x.to(compute) @ weight.to(compute).t()
    if bias is not None:
        out += bias.to(compute)
    if add_rmsnorm is not None:
        return add_rmsnorm_torch(out.to(x.dtype), *add_rmsnorm)
    return out.to(x.dtype)
