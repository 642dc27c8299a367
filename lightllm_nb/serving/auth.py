"""Who is calling: bearer tokens mapped to users, the proxy role, and the operator key.

The operator (the owner of `--api-key`) sees every user's requests and events. A token from the
tokens file acts as its own user; a token of role "proxy" (the Jupyter Server extension, the Hub
service) acts for the user it names in the `X-LightLLM-User` header.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

USER_HEADER = "X-LightLLM-User"
OPERATOR_USER = "operator"
ROLES = ("user", "proxy", "operator")
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


class AuthSetupError(ValueError):
    """A tokens file or key that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Caller:
    user: str
    operator: bool = False

    @property
    def view(self) -> str | None:
        """The user whose view of events and stats this caller gets; None means everything."""
        return None if self.operator else self.user


@dataclass(frozen=True)
class _Grant:
    token: str
    user: str
    role: str


class TokenTable:
    """Bearer tokens and what each may do."""

    def __init__(self, grants: list[_Grant]):
        if not grants:
            raise AuthSetupError("no API token is configured: pass --api-key, --api-key-file or --tokens-file")
        self._grants = grants

    @classmethod
    def from_sources(cls, api_key: str | None = None, tokens_file: str | os.PathLike | None = None) -> "TokenTable":
        grants = [_Grant(api_key, OPERATOR_USER, "operator")] if api_key else []
        if tokens_file is not None:
            grants += read_tokens_file(tokens_file)
        return cls(grants)

    def identify(self, authorization: str | None, acting_for: str | None) -> Caller | None:
        """The caller behind an Authorization header, or None when the token is missing or wrong."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        token = authorization[len("Bearer "):].strip()
        # Compare against every token in constant time, so timing reveals nothing about near misses.
        found = None
        for grant in self._grants:
            if hmac.compare_digest(grant.token.encode(), token.encode()):
                found = grant
        if found is None:
            return None
        if found.role == "operator":
            return Caller(found.user, operator=True)
        if found.role == "proxy" and acting_for:
            return Caller(acting_for)
        return Caller(found.user)


def valid_user_name(name: str) -> bool:
    return bool(_USER_NAME.match(name))


def read_tokens_file(path: str | os.PathLike) -> list[_Grant]:
    path = Path(path).expanduser()
    shape = '{"<token>": {"user": "alice"}, "<token2>": {"user": "jupyter-proxy", "role": "proxy"}}'
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise AuthSetupError(f"tokens file {str(path)!r} does not exist: create it as JSON {shape}") from None
    except (OSError, ValueError) as err:
        raise AuthSetupError(f"tokens file {str(path)!r} is not readable JSON ({err}): write it as {shape}") from None
    if not isinstance(table, dict):
        raise AuthSetupError(f"tokens file {str(path)!r} must hold a JSON object {shape}")
    grants = []
    for token, entry in table.items():
        user = entry.get("user") if isinstance(entry, dict) else None
        role = entry.get("role", "user") if isinstance(entry, dict) else None
        if len(token) < 8 or not isinstance(user, str) or not valid_user_name(user) or role not in ROLES:
            raise AuthSetupError(
                f"tokens file {str(path)!r}: the entry for token {token[:4]!r}... is invalid: each token needs "
                f"8+ characters and a value like {{\"user\": \"alice\"}} (user names: letters, digits, ._@+-; "
                f"optional role one of {ROLES})")
        grants.append(_Grant(token, user, role))
    return grants


def read_key_file(path: str | os.PathLike) -> str:
    path = Path(path).expanduser()
    try:
        key = path.read_text().strip()
    except OSError as err:
        raise AuthSetupError(f"cannot read the API key file {str(path)!r} ({err.strerror}): check the path") from None
    if not key:
        raise AuthSetupError(f"the API key file {str(path)!r} is empty: write the key into it")
    return key


def generate_key_file(path: str | os.PathLike) -> str:
    """A fresh random key, written to `path` readable by its owner only (mode 0600)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT
    return key
