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

# On the CPU a step is compute-bound from its first tokens and every running stream waits for it,
# so max_batch_tokens is what the CPUs compute in about CPU_STEP_SECONDS. On 2 cores, while a 5.4k-
# token prompt of the demo model prefilled, another stream waited up to 21-46 s for a token with 2048
# a step, 4 s with 256 (this rule's choice there), and the prompt itself finished sooner (42-36 s
# instead of 48-55 s: the CPU's attention costs more than linearly in the chunk).
CPU_STEP_SECONDS = 1.0
# float32 GEMM throughput of one core, measured: the demo model (212 MFLOP a token in its layers)
# prefilled 256 tokens in 0.8 s on 2 cores of the CI machine (~33 GFLOP/s a core), rounded down.
CPU_FLOPS_PER_CORE = 30e9
CPU_MAX_BATCH_TOKENS = (16, 2048)
# A decode row costs about two prefill tokens (the LM head and sampling on top): at 8 prefill tokens
# per running request, a full decode step stays near a quarter of the step budget. Measured, demo
# model on 2 cores (256 tokens a step): 136 tok/s at 16 running, 165 at 32, 124 at 64, 105 at 128.
CPU_TOKENS_PER_RUNNING = 8
# A CPU serves short contexts (a 1k-token prompt alone takes seconds): enough requests to fill the
# KV pool at this context, and never fewer than 4.
CPU_TYPICAL_CONTEXT = 256
CPU_MAX_RUNNING = (4, 128)


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _within(n: int, bounds: tuple[int, int]) -> int:
    return min(max(n, bounds[0]), bounds[1])


def activation_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Largest live activations of one token in a forward pass: hidden and residual, the fused qkv,
    attention output, and gate_up with its SiLU product (the widest)."""
    widths = 4 * config.hidden_size + config.q_size + 2 * config.kv_size + 3 * config.intermediate_size
    return widths * torch.finfo(dtype).bits // 8


def prefill_flops_per_token(config: ModelConfig) -> int:
    """FLOPs of one prompt token through every layer's projections (attention over the context and
    the LM head, which only sampled rows pay, left out)."""
    per_layer = config.hidden_size * (2 * config.q_size + 2 * config.kv_size + 3 * config.intermediate_size)
    return 2 * config.num_layers * per_layer


def choose_batch_limits(config: ModelConfig, dtype: torch.dtype, device: torch.device, kv_tokens: int,
                        max_running: int | None, max_batch_tokens: int | None, *, page_size: int = 1,
                        cpus: int = 1) -> tuple[int, int]:
    """(max_running, max_batch_tokens): the caller's values where given (checked by
    arguments.check_batch_limits), else the rule below; `stats()` shows what was chosen.

    GPU: max_running = the KV pool's tokens / TYPICAL_CONTEXT, rounded down to a power of two
    (a CUDA-graph bucket), within GPU_MAX_RUNNING; max_batch_tokens = 32 per running request
    within GPU_MAX_BATCH_TOKENS, and no more than ACTIVATION_BUDGET_BYTES of activations allow.
    CPU: max_batch_tokens = the tokens `cpus` cores prefill in about a second (CPU_FLOPS_PER_CORE
    over prefill_flops_per_token), a power of two within CPU_MAX_BATCH_TOKENS (256 for the demo
    model on 2 cores); max_running = max_batch_tokens / 8, and no more than fill the KV pool at
    CPU_TYPICAL_CONTEXT, a power of two within CPU_MAX_RUNNING (32 for the demo on 2 cores).
    Both: never more running than the pool has pages. The scheduler needs max_batch_tokens >=
    max_running (every running request decodes one token a step), so an explicit max_running
    raises the automatic max_batch_tokens to it, and an explicit max_batch_tokens caps the
    automatic max_running.
    """
    if device.type == "cuda":
        auto_running = _within(_power_of_two_at_most(kv_tokens // TYPICAL_CONTEXT), GPU_MAX_RUNNING)
        by_memory = _power_of_two_at_most(ACTIVATION_BUDGET_BYTES // activation_bytes_per_token(config, dtype))
        auto_tokens = max(GPU_MAX_BATCH_TOKENS[0], min(PREFILL_TOKENS_PER_RUNNING * (max_running or auto_running),
                                                       GPU_MAX_BATCH_TOKENS[1], by_memory))
    else:
        per_step = CPU_STEP_SECONDS * cpus * CPU_FLOPS_PER_CORE / prefill_flops_per_token(config)
        auto_tokens = _within(_power_of_two_at_most(per_step), CPU_MAX_BATCH_TOKENS)
        by_pool = kv_tokens // CPU_TYPICAL_CONTEXT
        auto_running = _within(_power_of_two_at_most(min(by_pool, auto_tokens // CPU_TOKENS_PER_RUNNING)),
                               CPU_MAX_RUNNING)
    auto_running = min(auto_running, max(1, kv_tokens // page_size))  # a running request holds a page at least
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
