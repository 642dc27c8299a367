"""The options of `%%lightllm`, parsed into what the magic does; bad options give a usage message."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import dataclass, fields, replace

from ..sampling_params import InvalidRequestError, SamplingParams

FORMATS = ("markdown", "text", "code")


class OptionError(ValueError):
    """A bad `%%lightllm` line; its message is the usage text plus what was wrong."""


@dataclass
class CellOptions:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    system: str | None = None
    raw: bool = False
    format: str = "markdown"
    chat: str | None = None
    var: str | None = None
    panel: bool = False
    user: str | None = None
    json_schema: dict | str | bool | None = None  # resolved from --json-schema FILE|VAR
    regex: str | None = None

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, json_schema=self.json_schema, regex=self.regex)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print and exit the kernel's process
        raise OptionError(f"{self.format_usage().strip()}\n%%lightllm: {message} (%lightllm help lists every option)")


def _parser(defaults: CellOptions) -> _Parser:
    p = _Parser(prog="%%lightllm", add_help=False,
                description="Send the cell to the engine as a chat message and stream the answer here.")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=defaults.seed, help="make sampling repeatable")
    p.add_argument("--system", default=defaults.system, help="system prompt")
    p.add_argument("--raw", action="store_true", default=defaults.raw,
                   help="send the cell as a plain prompt, not a chat message")
    p.add_argument("--format", choices=FORMATS, default=defaults.format, help="how to show the answer")
    p.add_argument("--chat", metavar="NAME", default=None, help="continue the named conversation")
    p.add_argument("--var", metavar="NAME", default=None, help="store the Completion in this variable")
    p.add_argument("--panel", action="store_true", default=defaults.panel,
                   help="show the live dashboard under the answer")
    p.add_argument("--user", default=defaults.user, help="act as this user (only where the engine allows it)")
    p.add_argument("--json-schema", metavar="FILE|VAR", default=None,
                   help="answer with JSON that fits this schema: a notebook variable (dict or JSON text) or a file")
    p.add_argument("--regex", default=None, help="answer with text that matches this regular expression")
    return p


def resolve_schema(source: str, namespace: dict) -> dict | str | bool:
    """`--json-schema NAME`: a notebook variable if one has that name, else a JSON file's text."""
    if source in namespace:
        return namespace[source]
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        raise OptionError(f"%%lightllm: --json-schema {source!r} is neither a variable of this notebook nor a "
                          "readable file: define the schema as a dict first, or give the file's path") from None
    try:
        json.loads(text)
    except ValueError as err:
        raise OptionError(f"%%lightllm: --json-schema file {source!r} is not JSON ({err})") from None
    return text


def parse_cell_line(line: str, defaults: CellOptions, namespace: dict | None = None) -> CellOptions:
    """`namespace` (the notebook's variables) resolves `--json-schema VAR`."""
    try:
        words = shlex.split(line)
    except ValueError as err:
        raise OptionError(f"%%lightllm: cannot read the options ({err}): close the quotes") from None
    args = _parser(defaults).parse_args(words)
    options = CellOptions(**{f.name: getattr(args, f.name) for f in fields(CellOptions)})
    if options.json_schema is not None:
        options.json_schema = resolve_schema(options.json_schema, namespace or {})
    if options.format not in FORMATS:
        raise OptionError(f"%%lightllm: format {options.format!r} is unknown: use one of {', '.join(FORMATS)}")
    for name in (options.var, options.chat):
        if name is not None and not name.isidentifier():
            raise OptionError(f"%%lightllm: {name!r} is not a valid name: use letters, digits and _")
    if options.raw and (options.chat or options.system):
        raise OptionError("%%lightllm: --raw sends a plain prompt, so --chat and --system do not apply: drop one")
    try:
        options.sampling()
    except InvalidRequestError as err:
        raise OptionError(f"%%lightllm: {err}") from None
    return options


def usage() -> str:
    return _parser(CellOptions()).format_help()


_SETTABLE = {"max_tokens": int, "temperature": float, "top_p": float, "seed": int, "system": str,
             "raw": bool, "format": str, "panel": bool, "user": str}


def updated_defaults(defaults: CellOptions, assignments: list[str]) -> CellOptions:
    """`%lightllm config max_tokens=128 format=text`: new defaults for later cells."""
    changes = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in _SETTABLE:
            raise OptionError(f"%lightllm config: cannot set {item!r}: write key=value with key one of "
                              f"{', '.join(_SETTABLE)}")
        changes[key] = _convert(key, text)
    new = replace(defaults, **changes)
    parse_cell_line("", new)  # the same checks a cell's options get
    return new


def _convert(key: str, text: str):
    kind = _SETTABLE[key]
    if text.lower() == "none" and key in ("seed", "system", "user"):
        return None
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise OptionError(f"%lightllm config: {key} takes true or false, not {text!r}")
        return text.lower() == "true"
    try:
        return kind(text)
    except ValueError:
        raise OptionError(f"%lightllm config: {key} takes a number, not {text!r}") from None


_NAME = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_names(cell: str, namespace: dict) -> str:
    """Replace `{name}` with the notebook variable's value; `{{` and `}}` are literal braces.
    Other braces (JSON, code) are left alone."""

    def value(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        if name not in namespace:
            raise OptionError(f"%%lightllm: the cell uses {{{name}}} but no variable {name} exists: "
                              f"define it first, or write {{{{{name}}}}} for literal braces")
        return str(namespace[name])

    return _NAME.sub(value, cell)
