"""The answer of a `%%lightllm` cell, streamed into one output by display-handle updates."""

from __future__ import annotations

import time

from IPython.display import Code, Markdown, Pretty, display

CURSOR = " \u258c"


def _shown(text: str, fmt: str):
    if fmt == "markdown":
        return Markdown(text)
    if fmt == "code":
        return Code(text)
    return Pretty(text)


class StreamingAnswer:
    """One output area that grows as text arrives; updated at most `rate` times a second (the
    latest text wins), so a fast engine does not flood the browser."""

    def __init__(self, fmt: str, rate: float = 10.0):
        self.fmt = fmt
        self.text = ""
        self.updates = 0
        self._interval = 1.0 / rate
        self._last = 0.0
        self._handle = display(_shown(CURSOR, fmt), display_id=True)

    def add(self, delta: str) -> None:
        self.text += delta
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._show(self.text + CURSOR)

    def finish(self, note: str = "") -> None:
        self._show(self.text + note)

    def _show(self, text: str) -> None:
        self.updates += 1
        self._handle.update(_shown(text, self.fmt))


def footer(completion, engine_line: str) -> str:
    """tokens, time to first token, tokens per second, cached prompt tokens."""
    m = completion.metrics or {}
    n = completion.completion_tokens
    ttft, total = m.get("time_to_first_token"), m.get("e2e_latency")
    parts = [f"{n} tokens"]
    if ttft is not None:
        parts.append(f"TTFT {ttft:.2f} s")
    if total and ttft is not None and n > 1 and total > ttft:
        parts.append(f"{(n - 1) / (total - ttft):.1f} tok/s")
    parts.append(f"{m.get('cached_tokens', 0)} of {completion.prompt_tokens} prompt tokens cached")
    if completion.finish_reason == "length":
        parts.append("stopped at --max-tokens")
    return " \u00b7 ".join(parts) + f" \u00b7 {engine_line}"
