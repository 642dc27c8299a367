"""Constraints that xgrammar would compile into something looser or different are refused when the
SamplingParams is made, with where (a path in the schema) and what to do; the ones it reads right
keep working. Outputs are drawn from the grammar over a vocabulary of the 256 bytes, no model.
"""

import json
import random
import re
import time

import jsonschema
import numpy as np
import pytest

from lightllm_nb import SamplingParams
from lightllm_nb.sampling_params import InvalidRequestError, xgrammar_grammar


@pytest.fixture(scope="module")
def compiler():
    import xgrammar as xgr

    vocab = [bytes([b]) for b in range(256)] + [b"</end>"]  # as the engine's compiler: cache on
    return xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, stop_token_ids=[256]), max_threads=1)


def _outputs(compiler, params, n=12, seed=0) -> list[str]:
    """n texts the constraint lets through, each byte drawn at random among the allowed ones."""
    import xgrammar as xgr

    compiled = compiler.compile_grammar(xgrammar_grammar(*params.constraint))
    rng, texts = random.Random(seed), []
    mask = xgr.allocate_token_bitmask(1, 257)
    for _ in range(n):
        matcher, out = xgr.GrammarMatcher(compiled), b""
        while len(out) < 300:
            matcher.fill_next_token_bitmask(mask)
            allowed = np.flatnonzero(np.unpackbits(mask[0].numpy().view(np.uint8), bitorder="little")[:257])
            token = 256 if 256 in allowed and rng.random() < 0.3 else int(rng.choice(allowed))
            if token == 256:
                break
            assert matcher.accept_token(token)
            out += bytes([token])
        texts.append(out.decode("utf-8"))
    return texts


def _refused(says: str, **kwargs) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        SamplingParams(**kwargs)


# 1. Keywords xgrammar does not enforce (outputs failed jsonschema validation).
@pytest.mark.parametrize("schema, says", [
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}},
     r"json_schema\.properties\.a\.oneOf cannot be enforced: .* use anyOf"),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
     r"json_schema\.allOf has 2 subschemas, .* merge them"),
    ({"type": "integer", "minimum": 5, "allOf": [{"maximum": 10}]},
     r"json_schema has minimum, type beside allOf, .* move them into the allOf subschema"),
    ({"$defs": {"A": {"type": "integer"}}, "$ref": "#/$defs/A", "maximum": 3}, r"json_schema has maximum beside \$ref"),
    ({"type": "object", "required": ["name"]},
     r"json_schema\.required names 'name', which json_schema\.properties does not define"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}},
     r"json_schema\.properties\.a\.\$ref='https://example.com/a.json' is not in this schema"),
    ({"anyOf": []}, r"json_schema\.anyOf is invalid: \[\] should be non-empty"),
    ({"type": "object", "properties": {"a": {"oneOf": []}}, "required": ["a"]},
     r"json_schema\.properties\.a\.oneOf is invalid: \[\] should be non-empty"),
    ({"type": "string", "pattern": "^(?=a)[a-c]{2}$"}, r"json_schema\.pattern does not compile: .*Lookahead"),
    ({"type": "object", "patternProperties": {"(?<=x)y": {"type": "integer"}}},
     r"json_schema\.patternProperties\['\(\?<=x\)y'\] does not compile: .*Lookbehind"),
])
def test_schema_rules_structured_output_would_drop_are_refused_where_they_are(schema, says):
    _refused(says, json_schema=schema)


TAGGED_UNION = {  # as pydantic writes Union[Cat, Dog] with Field(discriminator="pet")
    "$defs": {"Cat": {"type": "object", "properties": {"pet": {"const": "cat"}, "lives": {"type": "integer"}},
                      "required": ["pet", "lives"]},
              "Dog": {"type": "object", "properties": {"pet": {"const": "dog"}}, "required": ["pet"]}},
    "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
    "discriminator": {"propertyName": "pet", "mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"}},
}


@pytest.mark.parametrize("schema", [
    TAGGED_UNION,
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}],
     "description": "one subschema, annotated"},
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/A", "description": "x", "nullable": True}},
     "required": ["a"], "$defs": {"A": {"type": "string", "pattern": "^[a-z]{1,3}$"}}},
])
def test_combinators_xgrammar_reads_right_are_kept_and_their_outputs_validate(compiler, schema):
    for text in _outputs(compiler, SamplingParams(json_schema=schema)):
        jsonschema.validate(json.loads(text), schema)


# 2. Any JSON object, however it is written.
def test_any_json_object_as_text_means_the_same_as_the_dict():
    assert len({SamplingParams(json_schema=s).constraint for s in ({}, True, "{}", "true", " { } ")}) == 1


@pytest.mark.parametrize("schema", ["false", "[1, 2]", "5", 5, [1, 2]])
def test_a_schema_that_is_no_object_is_refused_naming_what_was_given(schema):
    _refused(re.escape(f"json_schema={schema!r} is invalid: it is not a JSON object; give a JSON schema as a dict"),
             json_schema=schema)


# 3. Schemas that are not JSON Schema, or not JSON.
@pytest.mark.parametrize("schema, says", [
    ({"type": "object", "properties": {"a": {"type": "strng"}}},
     r"json_schema\.properties\.a\.type is invalid: 'strng' is not a JSON type: give one of"),
    ({"type": []}, r"json_schema\.type is invalid: \[\] should be non-empty"),
    ({"type": ["string", "strng"]}, r"json_schema\.type\[1\] is invalid: 'strng' is not one of"),
    ({"type": "string", "pattern": 5}, r"json_schema\.pattern is invalid: 5 is not of type 'string'"),
    ({"type": "string", "minLength": -1}, r"json_schema\.minLength is invalid: -1 is less than the minimum of 0"),
    ({"type": "array", "items": {"type": "array", "minItems": -3}}, r"json_schema\.items\.minItems is invalid"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, r"json_schema: minLength=5 is greater than maxLength=2"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 3, "maxItems": 1}}},
     r"json_schema\.properties\.a: minItems=3 is greater than maxItems=1"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, r"json_schema: minimum=5 is greater than maximum=2"),
    ({"type": "number", "exclusiveMinimum": 5, "exclusiveMaximum": 5}, r"leave no value between them"),
    ({"type": "number", "maximum": float("nan")}, r"json_schema\.maximum=nan is not a JSON number"),
    ('{"type": "number", "minimum": -Infinity}', r"json_schema\.minimum=-inf is not a JSON number"),
    ({"type": "string", "enum": {"a", "b"}}, r"json_schema\.enum=.* is a set, not a JSON value"),
    ({"type": "string", "pattern": b"a+"}, r"json_schema\.pattern=b'a\+' is a bytes, not a JSON value"),
    ({"type": "object", "properties": {1: {"type": "integer"}}}, r"json_schema\.properties has the key 1"),
    ({"$schema": 4, "type": "string"}, r"json_schema\.\$schema is invalid"),
    ({"$schema": "http://json-schema.org/draft-03/schema#", "type": "object",
      "properties": {"a": {"type": "integer", "required": True}}}, r"draft 3"),
    ({"type": "string", "const": "a\ud800"}, r"json_schema\.const contains '\\ud800', a lone surrogate"),
])
def test_schemas_that_are_not_json_schema_are_refused_where_they_go_wrong(schema, says):
    _refused(says, json_schema=schema)


def _nested(levels: int) -> dict:
    schema = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema, "maxItems": 1}
    return schema


def test_schemas_nested_past_the_limit_are_refused_quickly():
    from lightllm_nb.constraint_checks import MAX_SCHEMA_DEPTH

    start = time.perf_counter()
    SamplingParams(json_schema=_nested(MAX_SCHEMA_DEPTH - 1))  # that many objects inside each other
    deep_text = '{"items": ' * 1000 + "{}" + "}" * 1000
    for too_deep in (_nested(MAX_SCHEMA_DEPTH), _nested(1000), deep_text, "[" * 100_000):
        _refused(f"json_schema is nested more than {MAX_SCHEMA_DEPTH} levels deep", json_schema=too_deep)
    assert time.perf_counter() - start < 2


# 4. Choices are written exactly, whatever characters they hold.
CHOICES = ["\x02beef", "\x01A", "x\x7fff", "Ñandú", "café1", 'a"b', "back\\slash", "\\u0041", "tab\there",
           "line\nbreak\r\n", "日本語", "😀1", "\u2028a", "\xa0b", "\\"]


@pytest.mark.parametrize("choice", CHOICES)
def test_a_choice_is_generated_exactly(compiler, choice):
    assert set(_outputs(compiler, SamplingParams(choice=[choice]), n=2)) == {choice}


def test_every_latin1_and_control_character_before_hex_digits_is_generated_exactly(compiler):
    for code in range(1, 0x100):
        choice = f"{chr(code)}beef"
        assert _outputs(compiler, SamplingParams(choice=[choice]), n=1) == [choice], hex(code)


def test_outputs_of_several_tricky_choices_are_among_them(compiler):
    assert set(_outputs(compiler, SamplingParams(choice=CHOICES), n=40)) <= set(CHOICES)


def test_a_choice_structured_output_cannot_write_is_refused():
    _refused("contains the NUL character", choice=["ok", "a\x00b"])
    _refused(r"choice contains '\\ud800', a lone surrogate", choice=["a\ud800"])
    _refused(r"regex contains '\\ud800', a lone surrogate", regex="a\ud800")


# 5. Regex syntax xgrammar reads differently, as regex= and as a schema's pattern.
@pytest.mark.parametrize("regex, says", [
    (r"abc\Z", r"\\Z, which structured output reads as the letter Z"),
    (r"\Aabc", r"\\A, which structured output reads as the letter A"),
    (r"abc\z", r"\\z, which"),
    ("a^b", r"has \^ at position 1"),
    ("ab$c", r"has \$ at position 2"),
    ("(^a|b)", r"has \^ at position 1"),
    (r"\h+", r"\\h, which structured output reads as the plain letter h"),
    (r"a\x01b", r"\\x at position 1 followed by 3 hex digits"),
    (r"\x{41}", r"\\x at position 0 followed by 0 hex digits"),
    (r"\u00e", r"\\u at position 0 without four hex digits"),
    (r"a\x00", r"matches the NUL character at position 1"),
    (r"[\0]", r"matches the NUL character"),
    ("[[:alpha:]]+", r"POSIX class \[:alpha:\]"),
])
def test_regex_syntax_read_differently_is_refused(regex, says):
    _refused(rf"regex={re.escape(repr(regex))} .*{says}", regex=regex)
    _refused(rf"json_schema\.properties\.a\.pattern=.*{says}",
             json_schema={"type": "object", "properties": {"a": {"type": "string", "pattern": regex}}})


@pytest.mark.parametrize("regex", [r"^abc$", r"[$^]x", r"\$\^", r"a\x41G", r"[\x00-\x7f]b", r"\u00e9a",
                                   r"[a^$]{2}", r"x\.\d", r"[a\"]{2}", r"[a-z] \d"])
def test_anchors_and_escapes_that_mean_what_they_say_are_kept(compiler, regex):
    for text in _outputs(compiler, SamplingParams(regex=regex)):
        assert re.fullmatch(regex, text), (regex, text)
    schema = {"type": "string", "pattern": regex}
    for text in _outputs(compiler, SamplingParams(json_schema=schema)):
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("regex", ['a"b', r"\\Z", r"a\nb", r"\x5c", "\t", r"\\"])
def test_a_pattern_matching_a_character_json_escapes_is_refused_in_a_schema_only(compiler, regex):
    """xgrammar writes such a character raw inside the JSON string: "a"b" is no JSON."""
    for text in _outputs(compiler, SamplingParams(regex=regex), n=2):
        assert re.fullmatch(regex, text)
    _refused(r"json_schema\.pattern=.* which structured output would write unescaped inside the JSON string",
             json_schema={"type": "string", "pattern": regex})
