"""Checks on a prompt before it is queued: what was wrong, and what to do instead."""

from __future__ import annotations

import numbers
from typing import Sequence

from ..sampling_params import InvalidRequestError, SamplingParams


def prompt_ids(tokenizer, vocab_size: int, prompt: str | None, prompt_token_ids: Sequence[int] | None) -> list[int]:
    """The prompt as token ids, from text or ids (exactly one of them)."""
    if (prompt is None) == (prompt_token_ids is None):
        raise InvalidRequestError("pass exactly one of prompt (text) or prompt_token_ids")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = tokenizer(prompt).input_ids if prompt else []
    else:
        if isinstance(prompt_token_ids, (str, bytes)) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt_token_ids):
            raise InvalidRequestError("prompt_token_ids must be a list of integer token ids (for several "
                                      "prompts, generate() takes a list of such lists)")
        ids = [int(t) for t in prompt_token_ids]
    if not ids:
        raise InvalidRequestError("prompt is empty: give at least one token of text")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt_token_ids contains {bad[:5]}: token ids must be in [0, {vocab_size})")
    return ids


def check_fits(ids: list[int], sampling: SamplingParams, limit: int) -> None:
    """The prompt and its longest answer must fit the context the engine serves."""
    total = len(ids) + sampling.max_tokens
    if len(ids) >= limit:
        raise InvalidRequestError(f"the prompt has {len(ids)} tokens but the context limit is {limit}: "
                                  f"shorten it to at most {limit - 1} tokens")
    if total > limit:
        raise InvalidRequestError(
            f"prompt ({len(ids)} tokens) + max_tokens ({sampling.max_tokens}) = {total} exceeds the "
            f"context limit of {limit} tokens: set max_tokens to at most {limit - len(ids)}")
