"""Start-up choices the engine makes once: device, dtype and how many KV tokens fit."""

from __future__ import annotations

import os

import torch

from ..host_cpus import usable_cpus
from ..models.config import ModelConfig

# Enough for a teaching session on a laptop without taking its memory: the CPU path is for
# small models and correctness, not for serving thousands of tokens in flight.
CPU_KV_BUDGET_BYTES = 1 << 30


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available here: "
                         "use device='cpu' or 'auto'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r} is not supported: use 'cpu', 'cuda' or 'auto'")
    return device


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, hf_config: dict) -> torch.dtype:
    """auto: float32 on the CPU (its half-precision GEMMs are slow), else the checkpoint's half type."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported: use 'auto' or one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    stored = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return torch.float16 if stored == "float16" else torch.bfloat16


def size_kv_tokens(config: ModelConfig, dtype: torch.dtype, device: torch.device, fraction: float) -> int:
    """How many tokens of K/V to allocate: a fraction of free GPU memory (after weights), as
    LightLLM does, or a fixed budget on the CPU."""
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Leave room for activations of the largest batch and the CUDA graphs' pools.
        budget = int(free * fraction) - (1 << 30)
    else:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget = min(CPU_KV_BUDGET_BYTES, ram // 8)
    if budget < per_token * 16:
        raise MemoryError(f"only {budget / 2**20:.0f} MiB are left for the KV cache on {device}: free memory "
                          "or pass kv_tokens=... explicitly")
    return budget // per_token


# Batch limits when the caller gives none (`Engine(max_running=None, max_batch_tokens=None)`).
# On the CPU they stay what they always were: a teaching machine needs no more.
CPU_MAX_RUNNING = 128
CPU_MAX_BATCH_TOKENS = 2048
# On a GPU, enough requests to fill the KV pool at this average context (prompt + output so far):
# a shorter average leaves pool unused, a longer one makes the scheduler defer or preempt anyway.
TYPICAL_CONTEXT = 1024
# Decode throughput stops growing past this batch on the models this engine serves (measured on
# an H200, Llama-3.2-1B shape: 256 and 512 running gave the same offline tok/s); the largest
# CUDA-graph bucket is 256 too.
GPU_MAX_RUNNING = (8, 256)
# A prefill chunk of 32 tokens per running request: the step that admits a prompt then costs
# about what a decode step of the whole batch does, so decodes are not stalled for long, and
# prefill runs GEMM-bound (8192 tokens at 256 running: the setting that doubled offline tok/s).
PREFILL_TOKENS_PER_RUNNING = 32
GPU_MAX_BATCH_TOKENS = (2048, 16384)
# Activations of the largest step must fit the memory size_kv_tokens leaves free.
ACTIVATION_BUDGET_BYTES = 1 << 30


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def activation_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Largest live activations of one token in a forward pass: hidden and residual, the fused qkv,
    attention output, and gate_up with its SiLU product (the widest)."""
    widths = 4 * config.hidden_size + config.q_size + 2 * config.kv_size + 3 * config.intermediate_size
    return widths * torch.finfo(dtype).bits // 8


def choose_batch_limits(config: ModelConfig, dtype: torch.dtype, device: torch.device, kv_tokens: int,
                        max_running: int | None, max_batch_tokens: int | None) -> tuple[int, int]:
    """(max_running, max_batch_tokens): the caller's values where given, else the rule below.

    GPU: max_running = the KV pool's tokens / TYPICAL_CONTEXT, rounded down to a power of two
    (a CUDA-graph bucket), within GPU_MAX_RUNNING; max_batch_tokens = 32 per running request
    within GPU_MAX_BATCH_TOKENS, and no more than ACTIVATION_BUDGET_BYTES of activations allow.
    CPU: CPU_MAX_RUNNING and CPU_MAX_BATCH_TOKENS. The scheduler needs max_batch_tokens >=
    max_running (every running request decodes one token a step), so an explicit max_running
    raises the automatic max_batch_tokens to it, and an explicit max_batch_tokens caps the
    automatic max_running.
    """
    for name, value in (("max_running", max_running), ("max_batch_tokens", max_batch_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} is invalid: pass a positive integer, or None to let the "
                             "engine choose from the device and the model")
    if device.type != "cuda":
        auto_running, auto_tokens = CPU_MAX_RUNNING, CPU_MAX_BATCH_TOKENS
    else:
        low, high = GPU_MAX_RUNNING
        auto_running = min(max(_power_of_two_at_most(kv_tokens // TYPICAL_CONTEXT), low), high)
        low, high = GPU_MAX_BATCH_TOKENS
        by_memory = _power_of_two_at_most(ACTIVATION_BUDGET_BYTES // activation_bytes_per_token(config, dtype))
        auto_tokens = max(low, min(PREFILL_TOKENS_PER_RUNNING * (max_running or auto_running), high, by_memory))
    # A small explicit max_batch_tokens caps the automatic max_running, not the other way round.
    running = max_running if max_running is not None else min(auto_running, max_batch_tokens or auto_running)
    tokens = max_batch_tokens if max_batch_tokens is not None else max(auto_tokens, running)
    return running, tokens


def cpu_threads_per_rank(device: torch.device, tp: int) -> int:
    """Torch threads for each of `tp` tensor-parallel ranks: on the CPU they share the usable CPUs
    (more threads would wait on each other); on GPUs a rank's host thread only launches kernels."""
    return max(1, usable_cpus() // tp) if device.type == "cpu" else 1


def limit_cpu_threads(device: torch.device) -> None:
    """On the CPU, never run more torch threads than there are usable CPUs. torch sizes its pool
    from the host's cores; in a container with a quota, the surplus threads wait on each other at
    every GEMM (a busy 2-CPU machine ran the demo 7-10x slower). Only ever lowers the count, so a
    thread count the user set stays."""
    if device.type == "cpu" and torch.get_num_threads() > usable_cpus():
        torch.set_num_threads(usable_cpus())
