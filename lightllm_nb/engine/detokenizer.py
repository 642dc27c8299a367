"""Incremental detokenization and stop strings, for requests that need text while they run.

Decoding the whole output every step costs O(n) per token; instead we decode a short window:
the text of tokens [prefix, read) is known, so the text of [prefix, end) minus it is the delta.
A delta ending in U+FFFD is an unfinished multi-byte character and waits for the next token.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...]):
        self.tokenizer = tokenizer
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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
