"""Checks on a prompt before it is queued: what was wrong, and what to do instead."""

from __future__ import annotations

import copy
import numbers
import threading
from typing import Sequence

from ..sampling_params import InvalidRequestError, SamplingParams
from .detokenizer import IncrementalDetokenizer


def prompt_ids(tokenizer, vocab_size: int, prompt: str | None, prompt_token_ids: Sequence[int] | None) -> list[int]:
    """The prompt as token ids, from text or ids (exactly one of them)."""
    if (prompt is None) == (prompt_token_ids is None):
        raise InvalidRequestError("pass exactly one of prompt (text) or prompt_token_ids")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = tokenizer(prompt).input_ids if prompt else []
    elif isinstance(prompt_token_ids, list) and all(type(t) is int for t in prompt_token_ids):
        ids = list(prompt_token_ids)  # the common case, checked without numbers.Integral's ABC (~1 ms at 2k ids)
    else:
        if isinstance(prompt_token_ids, (str, bytes)) or not hasattr(prompt_token_ids, "__iter__") or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt_token_ids):
            raise InvalidRequestError("prompt_token_ids must be a list of integer token ids (for several "
                                      "prompts, generate() takes a list of such lists)")
        ids = [int(t) for t in prompt_token_ids]
    if not ids:
        raise InvalidRequestError("prompt is empty: give at least one token of text")
    if min(ids) < 0 or max(ids) >= vocab_size:
        bad = [t for t in ids if not 0 <= t < vocab_size]
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


def sampling_params(value) -> SamplingParams:
    """SamplingParams from None, a SamplingParams or a dict of its fields."""
    if value is None:
        return SamplingParams()
    if isinstance(value, SamplingParams):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(SamplingParams.__dataclass_fields__))
        if unknown:
            raise InvalidRequestError(f"sampling has unknown fields {unknown}: the fields are "
                                      f"{sorted(SamplingParams.__dataclass_fields__)}")
        return SamplingParams(**value)
    raise InvalidRequestError(f"sampling must be a SamplingParams or a dict of its fields, "
                              f"got {type(value).__name__}")


class PromptEncoder:
    """Tokenization and chat templating on the caller's side, with the checks a prompt must pass.

    It holds its own copy of the tokenizer behind a lock: a fast (Rust) tokenizer used from two
    threads at once fails ("Already borrowed"), and the step thread decodes with the engine's copy.
    """

    def __init__(self, tokenizer, vocab_size: int, max_context: int, model_name: str):
        self._tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.model_name = model_name

    def encode(self, prompt: str | None, prompt_token_ids: Sequence[int] | None) -> list[int]:
        if prompt is not None and isinstance(prompt, str):
            with self._lock:
                return prompt_ids(self._tokenizer, self.vocab_size, prompt, None)
        return prompt_ids(None, self.vocab_size, prompt, prompt_token_ids)

    def chat_ids(self, messages) -> list[int]:
        if not isinstance(messages, (list, tuple)) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise InvalidRequestError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
        if not getattr(self._tokenizer, "chat_template", None):
            raise InvalidRequestError(f"the model {self.model_name} has no chat template: use generate() "
                                      "with a plain prompt instead")
        with self._lock:
            text = self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
            return self._tokenizer(text, add_special_tokens=False).input_ids

    def text_for(self, prompt_ids: list[int]) -> "CallerText":
        """Incremental text of a streamed request without stop strings, decoded by its reader."""
        return CallerText(self, prompt_ids)

    def request(self, prompt: str | None, prompt_token_ids: Sequence[int] | None, messages,
                sampling) -> tuple[list[int], SamplingParams]:
        """One request's prompt ids and sampling, checked: from text, ids or chat messages (exactly one)."""
        if messages is not None:
            if prompt is not None or prompt_token_ids is not None:
                raise InvalidRequestError("pass exactly one of prompt, prompt_token_ids or messages")
            ids = self.chat_ids(messages)
        else:
            ids = self.encode(prompt, prompt_token_ids)
        params = sampling_params(sampling)
        check_fits(ids, params, self.max_context)
        return ids, params


def check_user_and_priority(user, priority) -> None:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidRequestError(f"priority={priority!r} is invalid: it must be an integer (higher runs first)")
    if not isinstance(user, str) or not user:
        raise InvalidRequestError(f"user={user!r} is invalid: it must be a non-empty string")


class CallerText:
    """A streamed request's text, decoded on its reader's thread rather than the step thread (a
    request with stop strings is decoded by the engine instead: it must see them to stop)."""

    def __init__(self, encoder: PromptEncoder, prompt_ids: list[int]):
        self._encoder = encoder
        self._detokenizer = IncrementalDetokenizer(encoder._tokenizer, prompt_ids, ())

    def delta(self, new_token_ids: list[int], finish_reason: str | None) -> str:
        # A stop token ends the output but is not part of its text (as in the Completion).
        tokens = new_token_ids[:-1] if finish_reason == "stop" else new_token_ids
        with self._encoder._lock:
            for token in tokens:
                self._detokenizer.add(token)
            return self._detokenizer.take_delta(final=finish_reason is not None)
