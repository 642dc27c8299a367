"""How one request wants its tokens chosen, validated once when it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass


class InvalidRequestError(ValueError):
    """A request the engine refuses; the message names the parameter, the value and the limit."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


# Temperatures below this are greedy: the tempered distribution is then the argmax for any logit
# gap over 1e-3 (e^-100 for the runner-up), and dividing logits by a far smaller one overflows
# float32 (1e-38 turned every draw into noise).
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI/vLLM-style sampling knobs. ``temperature=0`` (or any below 1e-5) means greedy decoding."""

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
    # Structured output, at most one of: a JSON schema (dict or JSON text; {}, True, "{}" or "true":
    # any JSON object), a regular expression, a list of allowed answers, or an EBNF grammar
    # (xgrammar's). constraint_checks.py refuses what xgrammar would not enforce.
    json_schema: dict | str | bool | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

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
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                   f"{name}={value!r} is invalid: it must be a finite number")
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
        self._check_constraint()

    def _check_constraint(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        _check(len(given) <= 1, f"{' and '.join(given)} were given together: a request takes at most one "
               f"structured-output constraint ({', '.join(_CONSTRAINTS)})")
        if self.choice is not None:
            _check(isinstance(self.choice, (list, tuple)) and self.choice
                   and all(isinstance(c, str) and c for c in self.choice),
                   f"choice={self.choice!r} is invalid: give a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value),
                   f"{name}={value!r} is invalid: give a non-empty string")
        constraint = self.constraint
        if constraint is not None:
            from .constraint_checks import check_constraint  # here: it imports this module

            check_constraint(*constraint, given[0])

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, text) of the structured-output constraint, kind "json", "regex" or "ebnf";
        equal constraints have equal texts, so they share one compiled grammar."""
        from .constraint_checks import choice_grammar, schema_text  # here: they import this module

        if self.json_schema is not None and self.json_schema is not False:
            return "json", schema_text(self.json_schema)
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "ebnf", choice_grammar(self.choice)
        if self.grammar is not None:
            return "ebnf", self.grammar
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


_CONSTRAINTS = ("json_schema", "regex", "choice", "grammar")


def allowed_token_count(bitmask_row, vocab_size: int) -> int:
    """How many of the first `vocab_size` tokens an xgrammar bitmask row (int32 words) allows."""
    import numpy as np

    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")
    return int(bits[:vocab_size].sum())


def xgrammar_grammar(kind: str, text: str):
    import xgrammar as xgr

    if kind == "json":
        # Compact JSON: a small model given free whitespace can wander in it until max_tokens.
        return xgr.Grammar.from_json_schema(text, any_whitespace=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(text)
    return xgr.Grammar.from_ebnf(text)
