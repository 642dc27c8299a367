"""SwiGLU for the CPU path: silu(gate) * up with the product written over silu's output, one
allocation and one pass fewer than the twin (silu_mul_torch, the Triton kernel's oracle). Same bits:
float32 and float64 compute in their own dtype, as the twin does; narrower dtypes go through the twin
(it widens them to float32 first)."""

import torch
import torch.nn.functional as F

from .silu_mul import silu_mul_torch


def silu_mul_cpu(gate_up):
    """silu_mul_torch's contract: gate_up [T, 2F] (gate columns first, then up) -> [T, F]."""
    if gate_up.dtype not in (torch.float32, torch.float64):
        return silu_mul_torch(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)
