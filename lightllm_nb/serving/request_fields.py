"""Typed reads of JSON request fields: every wrong type or unknown name becomes a 400 that names
the field, what was given and what is expected."""

from __future__ import annotations

import json

from .api_errors import bad_request

MAX_BODY_BYTES = 4 << 20  # a full 128k-token prompt as text or as ids fits well below this


def parse_json_object(body: bytes) -> dict:
    if len(body) > MAX_BODY_BYTES:
        raise bad_request(f"the request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}: send a "
                          "shorter prompt")
    try:
        value = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON ({err}): send a JSON object") from None
    if not isinstance(value, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(value).__name__}")
    return value


def reject_unknown(body: dict, known: set[str], where: str = "request") -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"unknown field(s) {unknown} in the {where}; the accepted fields are {sorted(known)}",
                          param=unknown[0])


def optional(body: dict, name: str, types: type | tuple, default=None, what: str | None = None):
    """body[name] if present and not null, checked against `types` (bool is never an int here)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad_request(f"{name}={value!r} is invalid: expected {what or _names(types)}", param=name)
    if not isinstance(value, types):
        raise bad_request(f"{name}={_short(value)} is invalid: expected {what or _names(types)}", param=name)
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
    raise bad_request(f"{name}={_short(value)} is invalid: expected a string or a list of strings", param=name)


def int_list(value, name: str) -> list[int]:
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    raise bad_request(f"{name}={_short(value)} is invalid: expected a list of integer token ids", param=name)


def _names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
                        "list": "a list", "dict": "an object"}.get(t.__name__, t.__name__) for t in types)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
