"""The model's building blocks, chosen once at start: Triton kernels on CUDA, torch references elsewhere
(and a fused torch decode attention on the CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class KernelSet:
    name: str
    rmsnorm: Callable
    add_rmsnorm: Callable
    rotary_kv_write: Callable
    silu_mul: Callable
    decode_attention: Callable
    prefill_attention: Callable


def kernels_for(device: torch.device) -> KernelSet:
    from .. import kernels as k

    if device.type == "cuda":
        return KernelSet("triton", k.rmsnorm, k.add_rmsnorm, k.rotary_kv_write, k.silu_mul,
                         k.decode_attention, k.prefill_attention)
    # Decode attention is the one op where the twin (written to be read, the Triton kernels' oracle)
    # costs the CPU path real time: a fused equivalent, tested against the twin, runs instead.
    return KernelSet("torch", k.rmsnorm_torch, k.add_rmsnorm_torch, k.rotary_kv_write_torch, k.silu_mul_torch,
                     k.decode_attention_cpu, k.prefill_attention_torch)
