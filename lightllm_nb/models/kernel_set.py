"""The model's building blocks, chosen once at start: Triton kernels on CUDA, torch references elsewhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class KernelSet:
    name: str
    rmsnorm: Callable
    add_rmsnorm: Callable
    apply_rotary: Callable
    silu_mul: Callable
    write_kv: Callable
    decode_attention: Callable
    prefill_attention: Callable


def kernels_for(device: torch.device) -> KernelSet:
    from .. import kernels as k

    if device.type == "cuda":
        return KernelSet("triton", k.rmsnorm, k.add_rmsnorm, k.apply_rotary, k.silu_mul, k.write_kv,
                         k.decode_attention, k.prefill_attention)
    return KernelSet("torch", k.rmsnorm_torch, k.add_rmsnorm_torch, k.apply_rotary_torch, k.silu_mul_torch,
                     k.write_kv_torch, k.decode_attention_torch, k.prefill_attention_torch)
