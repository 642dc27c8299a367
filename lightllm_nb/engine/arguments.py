"""Engine settings checked before the (slow) model load: a typo costs a second, not a minute."""

from __future__ import annotations

import os

import torch

from ..scheduling.policies import make_policy
from .engine_setup import _DTYPES


# More requests at once than any engine here runs (decode stops gaining past 256 on an H200): a
# bigger max_running is a typo, refused before the load. Below it the KV pool decides, once sized.
MAX_RUNNING = 1 << 16
# The request rows' token table (req_to_token: max_running + 1 rows of max_context int32) beside
# the KV cache; 256 rows of a 131072-token context take 128 MiB.
ROW_TABLE_BUDGET_BYTES = 1 << 30
ENGINE_NAMES = {name: name for name in ("max_running", "max_batch_tokens", "kv_tokens", "page_size")}


class BatchLimitError(ValueError):
    """Batch limits that cannot work. The message names Engine's arguments; `naming(names)` gives it
    with the caller's own names for them (`lightllm-nb serve`: --max-num-seqs ...)."""

    def __init__(self, template: str, **values):
        self.template, self.values = template, values
        super().__init__(self.naming(ENGINE_NAMES))

    def naming(self, names: dict[str, str]) -> str:
        return self.template.format(**{**ENGINE_NAMES, **names}, **self.values)


def _positive_int(name: str, value, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= 1{hint}")


def check_batch_limits(max_running: int | None, max_batch_tokens: int | None, *, kv_tokens: int | None = None,
                       page_size: int = 1, max_context: int | None = None) -> None:
    """Refuse limits that cannot work, saying what to do. Before the model loads with what is known
    then (kv_tokens if given); again once the KV pool is sized, before its rows are allocated
    (`max_context` given)."""
    for name, value in (("max_running", max_running), ("max_batch_tokens", max_batch_tokens)):
        if value is not None:  # None: chosen from the device and the model (engine_setup.choose_batch_limits)
            _positive_int(name, value, ", or None to let the engine choose")
    if max_running is not None and max_running > MAX_RUNNING:
        raise BatchLimitError("{max_running}={n} is more requests at once than this engine runs (at most {top}): "
                              "pass a smaller value, or leave it unset to have it chosen from the device and the "
                              "KV cache", n=max_running, top=MAX_RUNNING)
    if max_running is not None and max_batch_tokens is not None and max_batch_tokens < max_running:
        raise BatchLimitError("{max_batch_tokens}={tokens} is less than {max_running}={n}: each running request "
                              "decodes a token every step, so raise {max_batch_tokens} to at least {n} or lower "
                              "{max_running}", tokens=max_batch_tokens, n=max_running)
    if kv_tokens is not None and kv_tokens < page_size:
        raise BatchLimitError("{kv_tokens}={kv} is less than one page ({page_size}={page}): raise {kv_tokens} or "
                              "lower {page_size}", kv=kv_tokens, page=page_size)
    if max_running is not None and kv_tokens is not None and max_running > kv_tokens // page_size:
        raise BatchLimitError("{max_running}={n} is more than the KV cache's {pages} pages ({kv_tokens}={kv}) can "
                              "hold, one page at least per running request: lower {max_running} to {pages} or "
                              "less, or raise {kv_tokens}", n=max_running, pages=kv_tokens // page_size, kv=kv_tokens)
    if max_running is not None and max_context is not None:
        table = (max_running + 1) * max_context * 4
        if table > ROW_TABLE_BUDGET_BYTES:
            raise BatchLimitError("{max_running}={n} rows of up to {context} tokens need {gib:.1f} GiB of token "
                                  "tables (1 GiB at most): lower {max_running} to {fit} or less",
                                  n=max_running, context=max_context, gib=table / 2**30,
                                  fit=ROW_TABLE_BUDGET_BYTES // (4 * max_context) - 1)


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
    check_batch_limits(max_running, max_batch_tokens, kv_tokens=kv_tokens, page_size=page_size)
    if max_running_per_user is not None:
        _positive_int("max_running_per_user", max_running_per_user, ", or None for no per-user cap")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed={seed!r} is invalid: it must be None or an integer in [0, 2**63)")
    if isinstance(kv_memory_fraction, bool) or not isinstance(kv_memory_fraction, (int, float)) \
            or not 0 < kv_memory_fraction <= 1:
        raise ValueError(f"kv_memory_fraction={kv_memory_fraction!r} is invalid: it must be in (0, 1]")
