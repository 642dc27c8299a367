"""How one request wants its tokens chosen, validated once when it is made."""

from __future__ import annotations

from dataclasses import dataclass


class InvalidRequestError(ValueError):
    """A request the engine refuses; the message names the parameter, the value and the limit."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI/vLLM-style sampling knobs. ``temperature=0`` means greedy decoding."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # how many top alternatives to report beside the chosen token

    def __post_init__(self) -> None:
        # Accept lists and single strings where tuples are meant: users write stop="\n".
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        _check(isinstance(self.stop, (list, tuple)),
               f"stop={self.stop!r} is invalid: give a string or a list of strings")
        _check(isinstance(self.stop_token_ids, (list, tuple)) and all(_is_int(t) for t in self.stop_token_ids),
               f"stop_token_ids={self.stop_token_ids!r} is invalid: give a list of token ids (integers)")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool),
                   f"{name}={value!r} is invalid: it must be a number")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
               f"seed={self.seed!r} is invalid: it must be None or an integer in [0, 2**63)")
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1,
               f"max_tokens={self.max_tokens!r} is invalid: it must be an integer >= 1")
        _check(self.temperature >= 0,
               f"temperature={self.temperature!r} is invalid: it must be >= 0 (0 means greedy)")
        _check(0 < self.top_p <= 1, f"top_p={self.top_p!r} is invalid: it must be in (0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= 0,
               f"top_k={self.top_k!r} is invalid: it must be an integer >= 0 (0 disables it)")
        _check(self.repetition_penalty > 0,
               f"repetition_penalty={self.repetition_penalty!r} is invalid: it must be > 0 (1 disables it)")
        _check(-2 <= self.presence_penalty <= 2,
               f"presence_penalty={self.presence_penalty!r} is invalid: it must be in [-2, 2]")
        _check(-2 <= self.frequency_penalty <= 2,
               f"frequency_penalty={self.frequency_penalty!r} is invalid: it must be in [-2, 2]")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop={self.stop!r} is invalid: stop strings must be non-empty strings")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
               f"logprobs={self.logprobs!r} is invalid: it must be None or an integer in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
