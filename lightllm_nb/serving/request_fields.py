"""Typed reads of JSON request fields: every wrong type or unknown name becomes a 400 that names
the field, what was given and what is expected; and a generating request's SamplingParams, whose
errors name the body field that set the value at fault."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..sampling_params import SamplingParams
from .api_errors import ApiError, bad_request

MAX_BODY_BYTES = 4 << 20  # a full 128k-token prompt as text or as ids fits well below this
CONSTRAINT_FIELDS = ("json_schema", "regex", "choice", "grammar")  # SamplingParams' structured output


@dataclass
class GenerationRequest:
    """A generating request's body, read and checked but for its sampling: `sampling` holds the
    SamplingParams fields, which `sampling_for` makes into SamplingParams (compiling a constraint to
    check it, which can take seconds: the handler runs that off the event loop)."""

    prompt_ids: list[int]
    sampling: dict
    stream: bool
    priority: int = 0
    include_usage: bool = False   # streaming: a last chunk with usage (stream_options.include_usage)
    prompt_field: str = "prompt"  # the body field the prompt came from
    fields: dict = field(default_factory=dict)  # SamplingParams field -> the body field that set it, if another
    unnamed: str | None = None    # the param of a sampling error whose field is not known

    @property
    def has_constraint(self) -> bool:
        return any(self.sampling.get(name) is not None for name in CONSTRAINT_FIELDS)


def sampling_for(request: GenerationRequest, max_context: int) -> SamplingParams:
    """The request's SamplingParams, and the check that its prompt and longest answer fit the
    context; a 400 naming the body field at fault otherwise."""
    try:
        sampling = SamplingParams(**request.sampling)
    except (ValueError, TypeError) as err:  # InvalidRequestError, or a value its checks did not foresee
        raise _named(str(err), request) from None
    n, limit = len(request.prompt_ids), max_context
    if n >= limit:
        raise bad_request(f"the prompt ({request.prompt_field}) has {n} tokens but the context limit is {limit}: "
                          f"shorten it to at most {limit - 1} tokens", param=request.prompt_field)
    if n + sampling.max_tokens > limit:
        name = request.fields.get("max_tokens", "max_tokens")
        raise bad_request(f"{name}={sampling.max_tokens} is too large for this prompt: its {n} tokens + "
                          f"{sampling.max_tokens} = {n + sampling.max_tokens} exceed the context limit of {limit} "
                          f"tokens; set {name} to at most {limit - n}", param=name)
    return sampling


_LEADING_NAME = re.compile(r"[A-Za-z_]+")


def _named(message: str, request: GenerationRequest) -> ApiError:
    """SamplingParams' messages begin with the field at fault (`top_p=0 is invalid...`, `json_schema
    does not compile...`): the 400 names the body field that set it, and the message says which
    where the two names differ (`response_format: json_schema does not compile...`)."""
    match = _LEADING_NAME.match(message)
    name = match.group(0) if match else None
    param = request.fields.get(name) or (name if name in request.sampling else request.unnamed)
    if param is not None and param != name:
        message = f"{param}: {message}"
    return bad_request(message, param=param)


def parse_json_object(body: bytes) -> dict:
    if len(body) > MAX_BODY_BYTES:
        raise bad_request(f"the request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}: send a "
                          "shorter prompt")
    if not body.strip():
        raise bad_request("the request body is empty: send a JSON object (Content-Type: application/json)")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON ({err}): send a JSON object") from None
    if not isinstance(value, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(value).__name__}")
    return value


def reject_unknown(body: dict, known: set[str], where: str | None = None) -> None:
    """`where`: the field `body` is the value of (its unknown fields are named `where.name`)."""
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"unknown field(s) {unknown} in the {where or 'request'}; the accepted fields are "
                          f"{sorted(known)}", param=f"{where}.{unknown[0]}" if where else unknown[0])


def optional(body: dict, name: str, types: type | tuple, default=None, what: str | None = None):
    """body[name] if present and not null, checked against `types` (bool is never an int here)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad_request(f"{name}={value!r} is invalid: expected {what or _names(types)}", param=name)
    if not isinstance(value, types):
        raise bad_request(f"{name}={shown(value)} is invalid: expected {what or _names(types)}", param=name)
    return value


def string_list(body: dict, name: str) -> list[str] | None:
    """A string or a list of strings (as `stop` takes)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise bad_request(f"{name}={shown(value)} is invalid: expected a string or a list of strings", param=name)


def int_list(value, name: str) -> list[int]:
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    raise bad_request(f"{name}={shown(value)} is invalid: expected a list of integer token ids", param=name)


def _names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
                        "list": "a list", "dict": "an object"}.get(t.__name__, t.__name__) for t in types)


def shown(value) -> str:
    """A value as an error message shows it: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
