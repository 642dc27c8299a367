"""Who may reuse whose prefix-cache pages: the defence against the prefix cache's timing side channel.

A prefix cache shared by every user is a side channel: someone who guesses the start of another
user's prompt sees a faster first token when the guess is cached (CVE-2025-46570, "Leaking Secrets
from Prefix Caches", arXiv 2411.18191). So every cached page belongs to a scope, and a request may
map only pages of its own scope:

- "user" (the default): a scope per authenticated user (`Request.user`, set by the server from the
  credentials, never from a request field). An embedded engine serving one notebook has one user,
  so there it behaves like "shared".
- "shared": one scope for everybody. Fastest when many users send the same text, and the side
  channel is open: use it only when every user may learn what the others send.

Operator-declared shared prefixes (a course's system prompt, a common document) are the middle
ground: the leading tokens a request has in common with a declared prefix live in a "declared"
scope that every user reuses; the rest of the prompt stays in its user's scope. Those tokens are
public by the operator's declaration, so reusing them tells a user nothing about anyone else's
prompt. (What remains: one user's work can evict another's cache, which shows load, not content.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

PREFIX_CACHE_SCOPES = ("user", "shared")

# Scope keys are tuples and user names are strings, so no user name can forge another scope.
DECLARED = ("declared",)
EVERYONE = ("shared",)


def check_prefix_cache_scope(scope: object) -> str:
    if scope not in PREFIX_CACHE_SCOPES:
        raise ValueError(f"prefix_cache_scope={scope!r} is invalid: use 'user' (each user reuses only "
                         "their own cached prefixes; the default) or 'shared' (everyone reuses everyone's: "
                         "faster, but a user can time whether a guessed prompt was sent by someone else)")
    return scope


def check_shared_prefixes(entries: object) -> list:
    """The shapes `shared_prefixes` accepts, checked before a model is loaded: each entry is text,
    a list of token ids, a list of chat messages, or a dict with one of "text", "token_ids", "messages"."""
    if entries is None:
        return []
    if isinstance(entries, (str, bytes, dict)) or not isinstance(entries, Sequence):
        raise ValueError("shared_prefixes must be a list of prefixes (text, token ids or chat messages), "
                         f"got {type(entries).__name__}: wrap a single prefix in a list")
    checked = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict):
            keys = set(entry) & {"text", "token_ids", "messages"}
            if len(keys) != 1 or len(entry) != 1:
                raise ValueError(f"shared_prefixes[{i}] has keys {sorted(entry)}: give exactly one of "
                                 "'text', 'token_ids' or 'messages'")
            kind, value = next(iter(entry.items()))
        elif isinstance(entry, str):
            kind, value = "text", entry
        elif isinstance(entry, Sequence) and entry and all(isinstance(m, dict) for m in entry):
            kind, value = "messages", entry
        elif isinstance(entry, Sequence):
            kind, value = "token_ids", entry
        else:
            raise ValueError(f"shared_prefixes[{i}] is a {type(entry).__name__}: give text, a list of token "
                             "ids or a list of chat messages")
        if not value:
            raise ValueError(f"shared_prefixes[{i}] is empty: declare at least one token of text")
        if kind == "token_ids" and not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                           for t in value):
            raise ValueError(f"shared_prefixes[{i}] must hold non-negative integer token ids")
        if kind == "text" and not isinstance(value, str):
            raise ValueError(f"shared_prefixes[{i}]['text'] must be a string")
        if kind == "messages" and not all(isinstance(m, dict) and "role" in m for m in value):
            raise ValueError(f"shared_prefixes[{i}]['messages'] must be chat messages: dicts with 'role' "
                             "and 'content'")
        checked.append((kind, value))
    return checked


def check_scope_settings(scope: object, shared_prefixes: object, prefix_cache: bool) -> None:
    """Engine(prefix_cache_scope=..., shared_prefixes=...) checked before the (slow) model load."""
    check_prefix_cache_scope(scope)
    if check_shared_prefixes(shared_prefixes) and not prefix_cache:
        raise ValueError("shared_prefixes are shared through the prefix cache, which prefix_cache=False turns "
                         "off: drop one of the two")


def read_shared_prefixes(path: str) -> list:
    """A JSON file of declared shared prefixes (`lightllm-nb serve --shared-prefixes FILE`): a list of
    entries as `Engine(shared_prefixes=...)` takes them, checked here so a bad file fails at start."""
    import json

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            entries = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): write a list of prefixes, e.g. "
                         '["You are the CS101 assistant.", {"messages": [{"role": "system", "content": "..."}]}]')
    try:
        check_shared_prefixes(entries)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return entries


def tokenize_shared_prefixes(entries: object, tokenizer) -> list[tuple[int, ...]]:
    """Token ids of each declared prefix, tokenized the way prompts are: text like a text prompt,
    messages like a chat prompt without the assistant's turn (so a declared system prompt is a prefix
    of every chat that starts with it)."""
    prefixes = []
    for kind, value in check_shared_prefixes(entries):
        if kind == "token_ids":
            ids = list(value)
        elif kind == "text":
            ids = tokenizer(value).input_ids
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("a shared prefix given as chat messages needs a model with a chat template: "
                                 "declare it as text or token ids instead")
            text = tokenizer.apply_chat_template(list(value), add_generation_prompt=False, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        prefixes.append(tuple(ids))
    return prefixes


@dataclass(frozen=True)
class CacheScopes:
    """The scope rule a PrefixCache applies: `mode` is "user" or "shared"; `shared_prefixes` are
    token ids the operator declared public (they matter only in "user" mode)."""

    mode: str = "user"
    shared_prefixes: tuple[tuple[int, ...], ...] = field(default=())

    def __post_init__(self) -> None:
        check_prefix_cache_scope(self.mode)
        object.__setattr__(self, "shared_prefixes", tuple(tuple(p) for p in self.shared_prefixes))

    def key(self, user: str) -> tuple:
        """The scope whose pages `user`'s requests map, beyond any declared prefix."""
        return EVERYONE if self.mode == "shared" else ("user", user)

    def declared_length(self, token_ids: list[int]) -> int:
        """How many leading tokens of `token_ids` are public: the longest run they share with a
        declared prefix. Any prefix of public text is public, so a prompt that departs from the
        declared one part way still shares the part before it."""
        if self.mode == "shared":
            return 0  # everything is shared already
        best = 0
        for prefix in self.shared_prefixes:
            n = min(len(prefix), len(token_ids))
            if n <= best:
                continue
            if list(prefix[:n]) == token_ids[:n]:  # the usual case: the whole prefix, at C speed
                best = n
                continue
            best = max(best, next(i for i in range(n) if prefix[i] != token_ids[i]))
        return best

    def describe(self) -> dict:
        """For Engine.stats(): the rule, and how long each declared prefix is (never its text)."""
        return {"prefix_cache_scope": self.mode, "shared_prefix_tokens": [len(p) for p in self.shared_prefixes]}

    def source_name(self) -> str:
        """What cached tokens outside a declared prefix are called in decisions and panels: never whose."""
        return "shared" if self.mode == "shared" else "own"
