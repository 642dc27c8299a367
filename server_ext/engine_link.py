"""Where the extension's engine host is, how to talk to it, and what the server should know of it."""

from __future__ import annotations

import getpass
import time

from jupyter_server._tz import utcnow
from tornado.ioloop import PeriodicCallback

from .supervisor import EngineSupervisor
from .upstream_pool import UpstreamPool

# Idle culling looks at the server's last activity; while a stream runs we refresh ours this often,
# so a long prefill with no output yet still counts as activity.
ACTIVITY_REFRESH_MS = 5000


class EngineLink:
    """One engine host, started by us (`supervisor`) or somebody else's (`url` + `token`)."""

    def __init__(self, settings: dict, *, supervisor: EngineSupervisor | None = None, url: str = "",
                 token: str = "", ready_timeout_s: float = 300.0):
        self.settings = settings
        self.supervisor = supervisor
        self.url = supervisor.url if supervisor is not None else url.rstrip("/")
        self.token = supervisor.proxy_token if supervisor is not None else token
        self.upstream = UpstreamPool(self.url)
        # The account this server runs as: the engine user of Jupyter's own token login (proxy.py).
        # Asked once: without $USER or $LOGNAME in the environment it is a passwd lookup.
        self.server_account = getpass.getuser()
        self.ready_timeout_s = ready_timeout_s
        self.active_streams = 0
        self.served = 0
        self._activity = PeriodicCallback(self._refresh_activity, ACTIVITY_REFRESH_MS)

    def start(self, *, launch: bool) -> None:
        """Begins activity reporting and, if `launch`, starts a supervised engine host now."""
        if launch and self.supervisor is not None:
            self.supervisor.start()
        self._activity.start()

    async def stop(self) -> None:
        self._activity.stop()
        self.upstream.close()
        if self.supervisor is not None:
            await self.supervisor.stop()

    async def ready(self) -> bool:
        """True once the engine host can take requests; lazily starts a supervised one."""
        if self.supervisor is None:
            return True
        return await self.supervisor.wait_ready(self.ready_timeout_s)

    def unavailable_reason(self) -> str:
        s = self.supervisor
        detail = f" ({s.last_error})" if s is not None and s.last_error else ""
        return (f"the lightllm engine host is not ready after {self.ready_timeout_s:.0f} s{detail}; "
                "see the Jupyter server's log, or raise c.LightLLM.startup_timeout for a large model")

    def auth_headers(self, user: str) -> dict[str, str]:
        # A `proxy` token may act for the user named here; any other token (a Hub service reached
        # with this server's JUPYTERHUB_API_TOKEN) is its own user and the host ignores the header.
        return {"Authorization": f"Bearer {self.token}", "X-LightLLM-User": user}

    # --- activity, for idle culling ---------------------------------------------------------------

    def stream_started(self) -> None:
        self.active_streams += 1
        self.served += 1
        self.touch()

    def stream_finished(self) -> None:
        self.active_streams -= 1
        self.touch()

    def touch(self) -> None:
        # ServerApp.last_activity() takes the newest of every setting whose name ends in
        # `_last_activity`; JupyterHub's culler reads that through the single-user server.
        self.settings["lightllm_last_activity"] = utcnow()

    def _refresh_activity(self) -> None:
        if self.active_streams:
            self.touch()

    def status(self) -> dict:
        s = self.supervisor
        return {
            "engine_url": self.url,
            "managed": s is not None,
            "state": s.state if s is not None else "external",
            "pid": s.pid if s is not None else None,
            "restarts": s.restarts if s is not None else 0,
            "last_error": s.last_error if s is not None else "",
            "active_streams": self.active_streams,
            "requests_served": self.served,
            "checked_at": time.time(),
        }

