"""`lightllm-nb serve --hub`: callers are JupyterHub users, identified by the Hub from their token.

The Hub runs the engine host as a service and gives it `JUPYTERHUB_API_URL` and
`JUPYTERHUB_SERVICE_NAME`. A caller sends its own Hub token (a kernel's `JUPYTERHUB_API_TOKEN`, a
token made on the Hub's token page) as `Authorization: Bearer`; we ask the Hub whose token it is and
accept it only if it carries the scope to access this service. Answers are cached for a short while so
a stream of requests costs one Hub round trip, not one each. Standard library only: the GPU box needs
no JupyterHub package to run the service.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request

from .api_errors import ApiError
from .auth import AuthSetupError, Caller, TokenTable

CACHE_SECONDS = 30.0


class HubAuthError(AuthSetupError):
    """`serve --hub` started outside a Hub service; the message says what to set."""


def _hub_unavailable(message: str) -> ApiError:
    # The caller did nothing wrong: 503, so clients retry instead of dropping their token.
    return ApiError(503, message, code="hub_unavailable")


def service_prefix(service_name: str | None = None) -> str:
    """The path under which the Hub's public proxy forwards requests to this service, e.g. `/services/lightllm`.

    The proxy passes the path on with that prefix, so the engine host must route it too. A managed
    service gets JUPYTERHUB_SERVICE_PREFIX from the Hub; an external one is at `/services/<name>/`
    unless its operator sets the variable (a Hub with its own base_url).
    """
    name = service_name or os.environ.get("JUPYTERHUB_SERVICE_NAME", "")
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX") or (f"/services/{name}/" if name else "")
    return "/" + prefix.strip("/") if prefix.strip("/") else ""


def hub_user(token: str, *, api_url: str, service_name: str, timeout: float = 5.0) -> str | None:
    """The name of the Hub user who owns `token`, if the token may use this service; else None."""
    request = urllib.request.Request(api_url.rstrip("/") + "/user", headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            model = json.load(response)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403, 404):
            return None  # unknown, expired or revoked token
        raise _hub_unavailable(f"the Hub at {api_url} answered {err.code} to a token check: is it healthy?") from err
    except (urllib.error.URLError, OSError) as err:
        raise _hub_unavailable(f"cannot reach the Hub at {api_url} ({err}): check JUPYTERHUB_API_URL") from err
    scopes = set(model.get("scopes") or ())
    allowed = {"access:services", f"access:services!service={service_name}"}
    if model.get("kind", "user") != "user" or not scopes & allowed:
        return None
    return model.get("name")


class HubTokens:
    """Drop-in for `TokenTable` in the engine host: Hub users, plus any local tokens (the operator key)."""

    def __init__(self, *, api_url: str | None = None, service_name: str | None = None,
                 local: TokenTable | None = None, cache_seconds: float = CACHE_SECONDS):
        self.api_url = api_url or os.environ.get("JUPYTERHUB_API_URL", "")
        self.service_name = service_name or os.environ.get("JUPYTERHUB_SERVICE_NAME", "")
        if not self.api_url or not self.service_name:
            raise HubAuthError("--hub needs JUPYTERHUB_API_URL and JUPYTERHUB_SERVICE_NAME: run `lightllm-nb "
                               "serve --hub` as a JupyterHub service (c.JupyterHub.services) or set both")
        self.local = local
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, str | None]] = {}  # sha256(token) -> (expiry, user)

    def identify(self, authorization: str | None, acting_for: str | None) -> Caller | None:
        if self.local is not None:
            caller = self.local.identify(authorization, acting_for)
            if caller is not None:
                return caller
        if not authorization or not authorization.startswith("Bearer "):
            return None
        token = authorization[len("Bearer "):].strip()
        # The Hub names the user; X-LightLLM-User is ignored, so nobody can act for somebody else.
        user = self._cached_user(token)
        return Caller(user) if user else None

    def _cached_user(self, token: str) -> str | None:
        key = hashlib.sha256(token.encode()).hexdigest()  # the cache never holds a usable token
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        user = hub_user(token, api_url=self.api_url, service_name=self.service_name)
        if len(self._cache) > 10_000:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._cache[key] = (now + self.cache_seconds, user)
        return user
