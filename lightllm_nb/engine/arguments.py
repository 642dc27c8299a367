"""Engine settings checked before the (slow) model load: a typo costs a second, not a minute."""

from __future__ import annotations

import os

import torch

from ..scheduling.policies import make_policy
from .engine_setup import _DTYPES


def _positive_int(name: str, value, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= 1{hint}")


def check_engine_args(*, dtype, kv_tokens, page_size, max_batch_tokens, max_running, scheduler,
                      max_running_per_user, seed, kv_memory_fraction, tp=1, model="demo") -> None:
    make_policy(scheduler)
    _positive_int("tp", tp, " (how many GPUs, or CPU processes, share the model)")
    if tp > 1 and not isinstance(model, (str, os.PathLike)):
        raise ValueError("tp>1 starts one process per rank, each loading its own shard: pass the model's name "
                         "or path, not a Checkpoint object")
    if not isinstance(dtype, torch.dtype) and dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: use 'auto' or one of {sorted(_DTYPES)}")
    if kv_tokens is not None:
        _positive_int("kv_tokens", kv_tokens, " (tokens of KV cache), or None to size it from free memory")
    _positive_int("page_size", page_size, " (1 = token-level KV)")
    for name, value in (("max_running", max_running), ("max_batch_tokens", max_batch_tokens)):
        if value is not None:  # None: chosen from the device and the model (engine_setup.choose_batch_limits)
            _positive_int(name, value, ", or None to let the engine choose")
    if max_running_per_user is not None:
        _positive_int("max_running_per_user", max_running_per_user, ", or None for no per-user cap")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed={seed!r} is invalid: it must be None or an integer in [0, 2**63)")
    if isinstance(kv_memory_fraction, bool) or not isinstance(kv_memory_fraction, (int, float)) \
            or not 0 < kv_memory_fraction <= 1:
        raise ValueError(f"kv_memory_fraction={kv_memory_fraction!r} is invalid: it must be in (0, 1]")
