"""The model's building blocks, chosen once at start: Triton kernels on CUDA, torch equivalents of
their twins elsewhere (kernels/*_cpu.py)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
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
        # The kernels of a decode step launch with programmatic dependent launch where the card has
        # it (kernels/dependent_launch.py): each starts while the one before it finishes.
        return KernelSet("triton", partial(k.rmsnorm, pdl=True), partial(k.add_rmsnorm, pdl=True),
                         partial(k.rotary_kv_write, pdl=True), partial(k.silu_mul, pdl=True),
                         partial(k.decode_attention, pdl=True), k.prefill_attention)
    # The twins are written to be read (and to be the Triton kernels' oracles); on the CPU each of
    # their torch calls costs the step real time, so equivalents with fewer calls, tested against the
    # twins, run instead (kernels/*_cpu.py). Decode attention keeps a step's gather plan for the
    # step's later layers: one per kernel set.
    return KernelSet("torch", k.rmsnorm_cpu, k.add_rmsnorm_cpu, k.rotary_kv_write_cpu, k.silu_mul_cpu,
                     k.DecodeAttentionCPU(), k.prefill_attention_cpu)
