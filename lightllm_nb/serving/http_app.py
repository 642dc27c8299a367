"""The engine host's tornado application: authentication, JSON errors and the small routes.

Generation routes live in `generation_routes.py`, the event websocket in `event_stream.py`. Every
handler runs on the IOLoop thread and talks to the engine only through the `DriverLoop`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import tornado.web

from .api_errors import ApiError, error_body
from .auth import USER_HEADER, Caller, TokenTable, valid_user_name
from .event_records import EventRecords
from .metrics import ServingMetrics
from .openai_api import models_list
from .served_model import ServedModel

log = logging.getLogger("lightllm_nb.serve")


@dataclass
class ServingContext:
    """What every handler shares: the loop, the model's front end, tokens and metrics."""

    driver: object            # a DriverLoop, or a RemoteDriver in a front-end process (--api-server-count)
    model: ServedModel
    tokens: TokenTable
    metrics: ServingMetrics
    route_prefix: str = ""    # also serve every route under this path (a Hub service's public prefix)
    started: float = field(default_factory=time.time)
    stopping: bool = False
    active: set = field(default_factory=set)   # handlers with a request in flight
    sockets: set = field(default_factory=set)  # open event websockets
    event_records: EventRecords = field(default_factory=EventRecords)  # what event websockets write, per view
    token_source: str = "a token this server knows"  # where callers get one, as a 401 tells them
    # Where requests' structured-output constraints compile to be checked, off the IOLoop: two
    # threads, so a burst of big schemas costs at most two cores and a plain request never waits.
    checks: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="lightllm-request-checks"))


def identify(handler: tornado.web.RequestHandler, ctx: ServingContext) -> Caller:
    acting_for = handler.request.headers.get(USER_HEADER)
    if acting_for is not None and not valid_user_name(acting_for):
        raise ApiError(400, f"{USER_HEADER}={acting_for[:40]!r} is not a valid user name (letters, digits, ._@+-)")
    caller = ctx.tokens.identify(handler.request.headers.get("Authorization"), acting_for)
    if caller is None:
        given = "a wrong" if handler.request.headers.get("Authorization") else "no"
        raise ApiError(401, f"{given} API token: send the header 'Authorization: Bearer <token>' with "
                            f"{ctx.token_source}", code="invalid_api_key")
    return caller


class ApiHandler(tornado.web.RequestHandler):
    """JSON in and out, bearer-token auth, and every error as OpenAI's error body."""

    needs_auth = True

    def initialize(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self.caller: Caller | None = None

    def prepare(self) -> None:
        if self.needs_auth:
            self.caller = identify(self, self.ctx)

    def check_xsrf_cookie(self) -> None:  # bearer tokens, not cookies: no CSRF surface
        pass

    def send_json(self, body: dict, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs) -> None:
        err = kwargs.get("exc_info", (None, None))[1]
        if isinstance(err, ApiError):
            self.set_status(err.status)
            body = err.body()
        elif isinstance(err, tornado.web.HTTPError):
            body = error_body(status_code, err.log_message or self._reason)
        else:
            body = error_body(status_code, "internal error: see the server log" if status_code >= 500 else self._reason)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, ApiError):  # the caller's mistake, answered with a 4xx: not a server fault
            log.info("%s %s -> %d: %s", self.request.method, self.request.path, value.status, value.message)
        else:
            super().log_exception(typ, value, tb)


class NotFoundHandler(ApiHandler):
    needs_auth = False

    def prepare(self) -> None:
        raise ApiError(404, f"no route {self.request.method} {self.request.path}: see /v1/models, "
                            "/v1/completions, /v1/chat/completions, /api/generate, /api/stats, /api/events, /metrics")


class HealthHandler(ApiHandler):
    needs_auth = False

    def get(self) -> None:
        if self.ctx.stopping:
            raise ApiError(503, "the server is shutting down")
        self.send_json({"status": "ok", "model": self.ctx.model.name})


class ModelsHandler(ApiHandler):
    def get(self) -> None:
        self.send_json(models_list(self.ctx.model, int(self.ctx.started)))


class StatsHandler(ApiHandler):
    async def get(self) -> None:
        self.send_json(await self.ctx.driver.astats(user=self.caller.view))


class AbortHandler(ApiHandler):
    async def post(self, request_id: str) -> None:
        if not await self.ctx.driver.aabort(request_id, user=self.caller.user):
            raise ApiError(404, f"no running request {request_id!r} of yours: it finished already, or the id is wrong")
        self.send_json({"aborted": True})


class MetricsHandler(ApiHandler):
    async def get(self) -> None:
        stats = await self.ctx.driver.astats()
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.ctx.metrics.render(stats))


def make_app(ctx: ServingContext) -> tornado.web.Application:
    from .event_stream import EventStreamHandler
    from .generation_routes import ChatHandler, CompletionHandler, NativeGenerateHandler

    routes = [(r"/health", HealthHandler), (r"/v1/models", ModelsHandler),
              (r"/v1/completions", CompletionHandler), (r"/v1/chat/completions", ChatHandler),
              (r"/api/generate", NativeGenerateHandler), (r"/api/abort/([A-Za-z0-9_.-]+)", AbortHandler),
              (r"/api/stats", StatsHandler), (r"/api/events", EventStreamHandler), (r"/metrics", MetricsHandler)]
    prefixes = ("", re.escape(ctx.route_prefix)) if ctx.route_prefix else ("",)
    return tornado.web.Application([(prefix + path, handler, {"ctx": ctx}) for prefix in prefixes
                                    for path, handler in routes],
                                   default_handler_class=NotFoundHandler, default_handler_args={"ctx": ctx},
                                   log_function=lambda handler: None)  # one line per request comes from us
