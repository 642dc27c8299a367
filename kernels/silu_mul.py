"""SwiGLU activation: silu(gate) * up over the fused gate_up projection output."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .dependent_launch import dependent_launch

_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, ffn, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # gate_up comes from the kernel before this one
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < ffn
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + ffn + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up, pdl=False):
    """gate_up [T, 2F] (gate columns first, then up) -> [T, F] = silu(gate) * up. pdl:
    programmatic dependent launch where the card has it (kernels/dependent_launch.py)."""
    tokens, width = gate_up.shape
    if width % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be [tokens, 2 * ffn] with a contiguous last dim, "
                         f"got shape {tuple(gate_up.shape)} strides {gate_up.stride()}")
    ffn = width // 2
    out = torch.empty((tokens, ffn), dtype=gate_up.dtype, device=gate_up.device)
    if tokens == 0:
        return out
    pdl = dependent_launch(pdl, gate_up)
    _silu_mul_kernel[(tokens, triton.cdiv(ffn, _BLOCK))](
        gate_up, out, gate_up.stride(0), out.stride(0), ffn, BLOCK=_BLOCK, PDL=pdl, launch_pdl=pdl)
    return out


def silu_mul_torch(gate_up):
    """Torch path of silu_mul: same signature and semantics."""
    # float32 at least; a float64 model (the exactness tests against HF) keeps float64.
    gate, up = gate_up.to(torch.promote_types(gate_up.dtype, torch.float32)).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)
