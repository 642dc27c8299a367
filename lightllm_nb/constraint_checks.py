"""Structured-output constraints checked when SamplingParams is made: refused with where and why,
rather than compiled into a grammar that quietly means something else.

xgrammar (0.2.9) builds a token mask from a JSON schema, a regex or EBNF, but where it cannot
express a rule it loosens it without a word: oneOf becomes anyOf, a second allOf subschema, a
remote $ref or a required property it has no schema for disappear, a lookahead inside a schema's
pattern is dropped, `\\Z` is read as the letter Z. The model then writes output that fails the very
schema it was given. Each such case found is refused here with its path in the schema (for example
json_schema.properties.a.type) and what to write instead.
"""

from __future__ import annotations

import json
import math
import re
from functools import cache, lru_cache

from .sampling_params import InvalidRequestError, allowed_token_count, xgrammar_grammar

# Deeper JSON (objects and arrays inside each other) is refused: real schemas are a few levels
# deep, and checking one 1000 levels deep ran out of Python's stack (and 300 took 2 s).
MAX_SCHEMA_DEPTH = 64
_ANY_JSON_OBJECT = '{"type": "object"}'

# Keywords xgrammar leaves out of the grammar it builds.
_UNSUPPORTED_SCHEMA_KEYWORDS = frozenset({
    "if", "then", "else", "not", "uniqueItems", "contains", "minContains", "maxContains",
    "propertyNames", "dependentRequired", "dependentSchemas", "dependencies",
    "unevaluatedProperties", "unevaluatedItems"})
# Keywords that restrict a value: xgrammar drops them beside allOf or $ref, loosening the schema
# (annotations and unknown keywords there restrict nothing, so they may stay).
_VALIDATION_KEYWORDS = _UNSUPPORTED_SCHEMA_KEYWORDS | {
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "maxProperties", "minProperties", "required",
    "properties", "patternProperties", "additionalProperties", "items", "prefixItems", "additionalItems",
    "anyOf", "oneOf", "allOf", "$ref"}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")   # name -> subschema
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")          # [subschema, ...]
_SCHEMA_ONE = ("items", "additionalProperties", "additionalItems")           # one subschema
_BOUNDS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"))
_JSON_TYPES = '"array", "boolean", "integer", "null", "number", "object" or "string"'


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


def schema_text(schema) -> str:
    """The canonical JSON text of a json_schema given as a dict or as JSON text; {} and True (or
    the texts "{}" and "true") mean any JSON object."""
    given = schema
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"json_schema is not valid JSON: {e.msg} at line {e.lineno} column "
                                      f"{e.colno}: fix the schema text or pass a dict") from None
        except RecursionError:
            raise InvalidRequestError(f"json_schema is nested more than {MAX_SCHEMA_DEPTH} levels deep: "
                                      "flatten it (name repeated parts in $defs and $ref them)") from None
    _check_json_value(schema, "json_schema", 0)
    if schema is True or schema == {}:
        return _ANY_JSON_OBJECT
    _check(isinstance(schema, dict), f"json_schema={given!r} is invalid: it is not a JSON object; give a "
           "JSON schema as a dict or as JSON text of one ({}, True or 'true' mean any JSON object)")
    return json.dumps(schema)  # key order kept: xgrammar writes properties in the schema's order


def _check_json_value(value, where: str, depth: int) -> None:
    """Refuse what json.dumps would reject or write as non-JSON (NaN), and nesting past the limit."""
    if isinstance(value, (dict, list, tuple)):
        _check(depth < MAX_SCHEMA_DEPTH, f"json_schema is nested more than {MAX_SCHEMA_DEPTH} levels deep (at "
               f"{where}): flatten it (name repeated parts in $defs and $ref them)")
    if isinstance(value, dict):
        for key, item in value.items():
            _check(isinstance(key, str), f"{where} has the key {key!r}: JSON object keys are strings")
            _check_text(key, f"{where} key {key!r}")
            _check_json_value(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, float):
        _check(math.isfinite(value), f"{where}={value!r} is not a JSON number: use a finite number")
    elif isinstance(value, str):
        _check_text(value, where)
    else:
        _check(value is None or isinstance(value, (bool, int)), f"{where}={value!r} is a {type(value).__name__},"
               " not a JSON value: use dicts, lists, strings, numbers, booleans and None")


def _check_text(text: str, where: str) -> None:
    """A lone UTF-16 surrogate (JSON's "\\ud800") is no character: xgrammar cannot take it as UTF-8."""
    bad = next((c for c in text if 0xD800 <= ord(c) <= 0xDFFF), None)
    _check(bad is None, f"{where} contains {bad!r}, a lone surrogate, not a character: remove it")


@lru_cache(maxsize=256)  # the same schema usually comes with every request; only ones that pass are kept
def check_constraint(kind: str, text: str, name: str) -> None:
    """Everything about a constraint that can be refused before any model work (see the module doc)."""
    _check_text(text, name)
    if kind == "json":
        _check_schema(json.loads(text))
    elif kind == "regex":
        check_regex(text, name)
    _check_compiles(kind, text, name)


def _check_schema(schema: dict) -> None:
    from jsonschema import Draft3Validator, Draft202012Validator
    from jsonschema.exceptions import best_match
    from jsonschema.validators import validator_for

    _check(isinstance(schema.get("$schema", ""), str), "json_schema.$schema is invalid: give the draft's URI")
    validator = validator_for(schema, default=Draft202012Validator)
    _check(validator is not Draft3Validator, "json_schema.$schema names JSON Schema draft 3, whose keywords "
           "structured output does not read: use draft 4 or later (2020-12 when $schema is left out)")
    # Against the draft's meta-schema, formats unchecked: jsonschema would judge a pattern by Python's
    # re, while xgrammar's reading of it is what counts (_check_pattern).
    error = best_match(validator(validator.META_SCHEMA).iter_errors(schema))
    if error is not None:
        where = _path("json_schema", error.absolute_path)
        if list(error.absolute_schema_path)[-3:] == ["properties", "type", "anyOf"]:
            problem = f"{error.instance!r} is not a JSON type: give one of {_JSON_TYPES}, or a non-empty list of them"
        else:
            problem = f"{error.message}; fix it to follow the JSON Schema specification"
        raise InvalidRequestError(f"json_schema does not compile: {where} is invalid: {problem}")
    _check_keywords(schema, "json_schema")


def _path(where: str, keys) -> str:
    return where + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys)


def _check_keywords(schema, where: str) -> None:
    """Walks the subschemas (the meta-schema has checked their shapes) for what xgrammar drops."""
    if not isinstance(schema, dict):
        return
    for key in schema:
        _check(key not in _UNSUPPORTED_SCHEMA_KEYWORDS,
               f"{where} uses the keyword {key!r}, which structured output cannot enforce: remove it "
               f"(and check that rule on the result yourself) or express it with supported keywords")
    _check_combinators(schema, where)
    _check_bounds(schema, where)
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        _check(name in properties, f"{where}.required names {name!r}, which {where}.properties does not "
               f"define: structured output writes only the properties it has a schema for, so the output "
               f"would lack it; define {name!r} under properties or drop it from required")
    if isinstance(schema.get("pattern"), str):
        _check_pattern(schema["pattern"], f"{where}.pattern")
    for pattern in schema.get("patternProperties", {}):
        _check_pattern(pattern, f"{where}.patternProperties[{pattern!r}]")
    for key, value in schema.items():
        if key in _SCHEMA_MAPS:
            for name, sub in value.items():
                _check_keywords(sub, f"{where}.{key}.{name}")
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                _check_keywords(sub, f"{where}.{key}[{i}]")
        elif key in _SCHEMA_ONE:
            _check_keywords(value, f"{where}.{key}")


def _check_combinators(schema: dict, where: str) -> None:
    # xgrammar reads oneOf as anyOf: right only where the branches exclude each other, which a
    # discriminator (pydantic's and OpenAPI's tagged unions: a const tag per branch) promises.
    _check("oneOf" not in schema or "discriminator" in schema,
           f"{where}.oneOf cannot be enforced: structured output reads it as anyOf, so an output may match "
           "several branches and fail validation; use anyOf if matching any branch is fine, or tag the "
           "branches with a const property and name it in a discriminator")
    ref = schema.get("$ref")
    _check(not isinstance(ref, str) or ref.startswith("#"), f"{where}.$ref={ref!r} is not in this schema: structured "
           "output reads only local references ('#/$defs/...'); copy that schema into $defs and refer to it")
    if "allOf" in schema:
        _check(len(schema["allOf"]) == 1, f"{where}.allOf has {len(schema['allOf'])} subschemas, which "
               "structured output cannot combine: merge them into one schema")
    for key, target in (("allOf", "the allOf subschema"), ("$ref", "the schema $ref points to")):
        others = sorted(k for k in schema if k != key and k in _VALIDATION_KEYWORDS)
        _check(key not in schema or not others, f"{where} has {', '.join(others)} beside {key}, which "
               f"structured output drops there: move them into {target}")


def _check_bounds(schema: dict, where: str) -> None:
    # xgrammar refuses most empty ranges too, but without saying where they are.
    bounds = {key: value for key, value in schema.items()  # draft 4's exclusiveMinimum: true is no bound
              if isinstance(value, (int, float)) and not isinstance(value, bool)}
    for low, high in _BOUNDS + (("minimum", "maximum"),):
        if low in bounds and high in bounds and bounds[low] > bounds[high]:
            raise InvalidRequestError(f"{where}: {low}={bounds[low]} is greater than {high}={bounds[high]}, so "
                                      "no value fits: fix the bounds")
    for low, high in (("exclusiveMinimum", "maximum"), ("minimum", "exclusiveMaximum"),
                      ("exclusiveMinimum", "exclusiveMaximum")):
        if low in bounds and high in bounds and bounds[low] >= bounds[high]:
            raise InvalidRequestError(f"{where}: {low}={bounds[low]} and {high}={bounds[high]} leave no value "
                                      "between them: fix the bounds")


def _check_pattern(pattern: str, where: str) -> None:
    """A schema's pattern gets the regex= checks: inside a schema xgrammar drops what it cannot read
    (a lookahead) instead of refusing it."""
    import xgrammar as xgr

    check_regex(pattern, where, in_json_string=True)
    _xgrammar_call(lambda: xgr.Grammar.from_regex(pattern), where)


# Escaped letters xgrammar reads as the plain letter, where Python, PCRE or ECMAScript mean an anchor
# (\A, \Z, \z, \G), a class (\h, \R, \X) or quoting (\Q...\E).
_PLAIN_LETTER_ESCAPES = frozenset("ghijlmoqyzACEFGHIJKLMNOQRTUVXYZ")
_ANCHOR_ESCAPES = frozenset("AZz")
_ESCAPED_CODES = {"0": 0, "a": 7, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, "e": 27, '"': 34, "\\": 92}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_POSIX_CLASS = re.compile(r"\[:[a-z]+:\]")


def check_regex(pattern: str, where: str, in_json_string: bool = False) -> None:
    """Refuse regex syntax that xgrammar parses but reads differently: anchors it drops or reads as
    letters, \\x escapes that swallow a following hex digit, NUL (it can write none), POSIX classes;
    in a schema's pattern also a literal character JSON must escape, which xgrammar writes raw."""
    in_class, i = False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i = _check_escape(pattern, i, in_class, where, in_json_string)
            continue
        posix = _POSIX_CLASS.match(pattern, i) if in_class else None
        if posix:
            raise InvalidRequestError(f"{where}={pattern!r} uses the POSIX class {posix.group()} inside [...], which "
                                      "structured output reads as single characters: list the characters or "
                                      "ranges instead, e.g. [a-zA-Z] for [:alpha:]")
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif (c == "^" and i > 0) or (c == "$" and i < len(pattern) - 1):
            # The whole text is matched, so a leading ^ and a trailing $ are harmless; elsewhere
            # xgrammar drops them ("a^b" matched "ab").
            place = "at the start" if c == "^" else "at the end"
            raise InvalidRequestError(f"{where}={pattern!r} has {c} at position {i}: structured output matches "
                                      f"the whole text and ignores {c} anywhere but {place}; remove it, or write "
                                      f"\\{c} for the character")
        elif in_json_string:
            _check_json_char(ord(c), pattern, i, where)
        i += 1


def _check_escape(pattern: str, i: int, in_class: bool, where: str, in_json_string: bool) -> int:
    """Checks the escape at pattern[i] (a backslash); returns the index just past it."""
    letter = pattern[i + 1:i + 2]
    if letter in _ANCHOR_ESCAPES:
        raise InvalidRequestError(f"{where}={pattern!r} uses \\{letter}, which structured output reads as the "
                                  f"letter {letter}: remove it (the whole text is matched anyway)")
    _check(letter not in _PLAIN_LETTER_ESCAPES, f"{where}={pattern!r} uses \\{letter}, which structured output "
           f"reads as the plain letter {letter}: write {letter} without the backslash, or spell out what you meant")
    end, code = i + 2, _ESCAPED_CODES.get(letter)
    if letter == "x":
        end = next(n for n in range(i + 2, len(pattern) + 1) if pattern[n:n + 1] not in _HEX_DIGITS)
        _check(end - (i + 2) == 2, f"{where}={pattern!r} has \\x at position {i} followed by {end - (i + 2)} hex "
               "digits: structured output reads every hex digit that follows as part of it; write exactly two, "
               "and put a hex digit that comes next in brackets (\\x01[b] for \\x01 then b)")
        code = int(pattern[i + 2:end], 16)
    elif letter == "u" and pattern[i + 2:i + 3] != "{":
        end = i + 6
        _check(len(pattern[i + 2:end]) == 4 and set(pattern[i + 2:end]) <= _HEX_DIGITS, f"{where}={pattern!r} has "
               f"\\u at position {i} without four hex digits after it: structured output reads it as the letter "
               "u; write \\u and four hex digits (\\u00e9 for é)")
        code = int(pattern[i + 2:end], 16)
    # NUL is the one character xgrammar cannot write: alone it matches nothing, even the empty string
    # (\x00 let "" through). As the start of a range ([\x00-\x1f]) it is read right.
    _check(code != 0 or (in_class and pattern[end:end + 1] == "-" and pattern[end + 1:end + 2] not in ("", "]")),
           f"{where}={pattern!r} matches the NUL character at position {i}, which structured output cannot "
           "write: leave it out")
    if in_json_string and not in_class and code is not None:
        _check_json_char(code, pattern, i, where)
    return end


def _check_json_char(code: int, pattern: str, i: int, where: str) -> None:
    # A character JSON strings must escape, matched on its own: xgrammar writes it raw into the
    # string ("a\"b" came out as "a"b"), so the output is not JSON. Character classes it filters.
    _check(code >= 0x20 and code not in (0x22, 0x5C), f"{where}={pattern!r} matches {chr(code)!r} at position "
           f"{i}, which structured output would write unescaped inside the JSON string, making the output invalid "
           "JSON: leave it out of the pattern")


def choice_grammar(choices) -> str:
    """EBNF for exactly one of `choices`. xgrammar keeps literals as text with \\xHH escapes for
    control and Latin-1 characters and reads back as many hex digits as follow ("\\x02beef" came back
    as U+2BEEF, "Ñandú" as "ചndú"), so such a character ends its string literal; NUL it cannot write."""
    return "root ::= " + " | ".join(_ebnf_literals(c) for c in choices)


def _ebnf_literals(text: str) -> str:
    _check("\0" not in text, f"choice {text!r} contains the NUL character, which structured output cannot "
           "write: remove it")
    literals, run = [], ""
    for c in text:
        if c in '"\\':
            run += "\\" + c
        elif ord(c) < 0x20 or 0x7F <= ord(c) < 0x100:
            literals.append(f'"{run}\\x{ord(c):02x}"')
            run = ""
        else:
            run += c
    if run or not literals:
        literals.append(f'"{run}"')
    return " ".join(literals)


def _check_compiles(kind: str, text: str, name: str) -> None:
    """Compile the constraint against a vocabulary of the 256 single bytes, so errors surface when
    the params are made, before any model work: a syntax or schema error (xgrammar's message says
    where), or a constraint no text satisfies (no byte is allowed first and it isn't complete)."""
    import xgrammar as xgr  # lazily: importing it costs seconds and most requests never need it

    compiled = _xgrammar_call(lambda: _byte_compiler().compile_grammar(xgrammar_grammar(kind, text)), name)
    mask = xgr.allocate_token_bitmask(1, 257)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(mask)
    _check(allowed_token_count(mask[0], 257) > 0,
           f"{name}={text!r} cannot match any text: no string satisfies it; check it for an empty "
           "character class or contradictory rules")


def _xgrammar_call(build, name: str):
    """build(), with xgrammar's error turned into an InvalidRequestError that names `name`."""
    try:
        return build()
    except RuntimeError as e:
        message = str(e).strip().splitlines()[0]
        message = message.split(": ", 1)[-1] if message.startswith("[") else message  # drop C++ file:line
        raise InvalidRequestError(f"{name} does not compile: {message}") from None


@cache
def _byte_compiler():
    """A grammar compiler over a vocabulary of the 256 bytes plus an end token (id 256): enough to
    tell whether a constraint compiles and can match anything, independent of any model."""
    import xgrammar as xgr

    vocab = [bytes([b]) for b in range(256)] + [b"</end>"]
    # Uncached, as the engine's (engine/grammar.py says why), so the check compiles what the engine will.
    return xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, stop_token_ids=[256]), max_threads=1, cache_enabled=False)
