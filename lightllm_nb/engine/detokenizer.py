"""Incremental detokenization and stop strings, for requests that need text while they run.

Decoding the whole output every step costs O(n) per token; instead we decode a short window:
the text of tokens [prefix, read) is known, so the text of [prefix, end) minus it is the delta.
A delta ending in U+FFFD is an unfinished multi-byte character and waits for the next token.
"""

from __future__ import annotations

from typing import Callable


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, as cheaply as it can be had. Every streamed
    token decodes two short windows; a fast tokenizer's `decode` wraps its Rust backend in ~10 us of
    Python checks per call (4x the decode itself), so the backend is called directly where that is
    the same function: a Rust-backed tokenizer that does not clean up spaces afterwards."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...]):
        self._decode = text_decoder(tokenizer)
        self.stop = stop
        # Start the window a few prompt tokens back, so the first output token is decoded in
        # context (sentencepiece tokenizers drop a leading space on a token decoded alone).
        self._ids = list(prompt_ids[-4:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""
        self._emitted = 0

    def add(self, token_id: int) -> bool:
        """Append one generated token; True when a stop string now appears in the text."""
        self._ids.append(token_id)
        known = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        if len(full) <= len(known) or full.endswith("\ufffd"):
            return False
        delta = full[len(known):]
        self._prefix, self._read = self._read, len(self._ids)
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += delta
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at >= 0:
                self.text = self.text[:at]
                return True
        return False

    def take_delta(self, final: bool) -> str:
        """Text not handed out yet. Until the end, hold back what could be the start of a stop string."""
        hold = 0 if final else max((len(s) - 1 for s in self.stop), default=0)
        end = max(self._emitted, len(self.text) - hold)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
