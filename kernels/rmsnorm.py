"""RMSNorm, alone and fused with the residual add that precedes it in every Llama block.

Semantics follow HF ``LlamaRMSNorm``: normalize in float32, cast to the activation dtype, then
multiply by the weight, so the Triton path, the torch path and HF agree to the last bf16 bit
(up to the rounding of the reciprocal square root).
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .dependent_launch import dependent_launch


@triton.jit
def norm_row(x_row, residual_row, weight_ptr, out_row, hidden, eps,
             HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr):
    """One row: residual += x (when HAS_RESIDUAL), out = rmsnorm(that) * weight. Inlined here and
    into the GEMV that ends with it (kernels/gemv.py), so both round exactly alike. x is read
    from L2 (.cg): there, other programs of the same launch wrote it."""
    offs = tl.arange(0, BLOCK_H)
    mask = offs < hidden
    x = tl.load(x_row + offs, mask=mask, other=0.0, cache_modifier=".cg")
    if HAS_RESIDUAL:
        summed = tl.load(residual_row + offs, mask=mask, other=0.0).to(tl.float32) + x.to(tl.float32)
        # Round to the residual dtype before normalizing: the torch path normalizes the stored
        # residual, and the next layer adds onto exactly what is stored.
        x = summed.to(residual_row.dtype.element_ty)
        tl.store(residual_row + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    # HF casts the normalized value to the activation dtype before the weight multiply.
    normed = (xf * rstd).to(out_row.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_row + offs, (normed * w).to(out_row.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr,
    stride_x, stride_residual, stride_out,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # everything this kernel reads may come from the one before it
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    norm_row(x_ptr + row * stride_x, residual_ptr + row * stride_residual, weight_ptr, out_ptr + row * stride_out,
             hidden, eps, HAS_RESIDUAL, BLOCK_H)


def norm_warps(hidden: int) -> int:
    """Warps for a program that normalizes one row of `hidden` (the reduction order follows them)."""
    return min(16, max(1, triton.next_power_of_2(hidden) // 512))


def _launch(x, residual, weight, eps, out, pdl):
    rows, hidden = out.shape
    if rows == 0:
        return
    block = triton.next_power_of_2(hidden)
    pdl = dependent_launch(pdl, out)
    _rmsnorm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, out,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_H=block, PDL=pdl, num_warps=norm_warps(hidden), launch_pdl=pdl,
    )


def _check_rows(name, t, hidden):
    if t.dim() != 2 or t.shape[1] != hidden or t.stride(1) != 1:
        raise ValueError(f"{name} must be [tokens, {hidden}] with a contiguous last dim, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")


def rmsnorm(x, weight, eps, pdl=False):
    """x [T, H], weight [H] -> x / rms(x) * weight, in x.dtype. pdl: programmatic dependent
    launch where the card has it (kernels/dependent_launch.py)."""
    _check_rows("x", x, weight.shape[0])
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, None, weight, eps, out, pdl)
    return out


def add_rmsnorm(x, residual, weight, eps, pdl=False):
    """residual += x in place (residual dtype); returns (rmsnorm(residual), residual). pdl: as rmsnorm's."""
    _check_rows("x", x, weight.shape[0])
    _check_rows("residual", residual, weight.shape[0])
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ in shape")
    out = torch.empty_like(residual, memory_format=torch.contiguous_format)
    _launch(x, residual, weight, eps, out, pdl)
    return out, residual


def rmsnorm_torch(x, weight, eps):
    """Torch path of rmsnorm: same signature and semantics."""
    # float32 even for a float64 model: HF normalizes in float32 whatever the input dtype.
    xf = x.float()
    normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (normed.to(x.dtype) * weight).to(x.dtype)


def add_rmsnorm_torch(x, residual, weight, eps):
    """Torch path of add_rmsnorm: updates residual in place, returns (out, residual)."""
    residual.add_(x)
    return rmsnorm_torch(residual, weight, eps), residual
