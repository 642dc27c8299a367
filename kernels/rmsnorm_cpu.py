"""RMSNorm (alone and after the residual add) for the CPU path: torch's own rms_norm, one call where
the twin (rmsnorm_torch, the Triton kernel's oracle) makes six from Python. Same signatures, same bits.

torch's CPU rms_norm runs HF's sequence in C++ (float32 square, mean, + eps, rsqrt, scale, then the
weight), so a float32 model's result is the twin's to the bit (tests/test_kernels_cpu.py checks it on
fresh random rows). For other dtypes HF normalizes in float32 and casts back before the weight, which
torch's rms_norm does not (it keeps bfloat16 / float64 throughout): those normalize without the weight
in float32, then multiply in the model's dtype, as the twin does.
"""

import torch
import torch.nn.functional as F


def rmsnorm_cpu(x, weight, eps):
    """rmsnorm_torch's contract: x [T, H], weight [H] -> x / rms(x) * weight, in x.dtype."""
    shape = (x.shape[-1],)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, shape, weight, eps)
    return (F.rms_norm(x.float(), shape, None, eps).to(x.dtype) * weight).to(x.dtype)


def add_rmsnorm_cpu(x, residual, weight, eps):
    """add_rmsnorm_torch's contract: residual += x in place; returns (rmsnorm(residual), residual)."""
    residual.add_(x)
    return rmsnorm_cpu(residual, weight, eps), residual
