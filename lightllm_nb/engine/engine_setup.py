"""Start-up choices the engine makes once: device, dtype and how many KV tokens fit."""

from __future__ import annotations

import os

import torch

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
