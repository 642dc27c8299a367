"""`lightllm-nb serve`: one process that loads a model, runs its DriverLoop and serves HTTP.

The step loop runs in the DriverLoop's thread, tornado's IOLoop in the main thread; HTTP parsing,
tokenization and templating happen on the IOLoop (a structured-output constraint compiles, to be
checked, on a worker thread), so the engine thread only schedules and runs.
With `--api-server-count N` the IOLoop runs in N processes of its own instead (api_servers.py).
SIGTERM (or Ctrl-C) stops gracefully: new requests get a 503, in-flight ones get
`--shutdown-timeout` seconds to finish, the rest are aborted, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..host_cpus import can_watch_child_processes, usable_cpus
from .auth import TokenTable, generate_key_file, read_key_file

log = logging.getLogger("lightllm_nb.serve")
MAX_HTTP_BODY = 16 << 20  # above the API's own limit, so a too-large body gets a JSON 400, not a reset
API_KEY_ENV = "LIGHTLLM_API_KEY"


@dataclass
class KeySetup:
    tokens: TokenTable
    generated_key_file: Path | None = None
    source: str = "a token this server knows"  # where callers get a token: a 401 says it


def resolve_tokens(api_key: str | None, api_key_file: str | None, tokens_file: str | None,
                   default_key_file: Path, hub: bool = False) -> KeySetup:
    """The tokens this server accepts; with none given (and no Hub), a fresh operator key written mode 0600."""
    if api_key or os.environ.get(API_KEY_ENV):
        key, given = (api_key, "--api-key") if api_key else (os.environ[API_KEY_ENV], API_KEY_ENV)
    else:
        key, given = (read_key_file(api_key_file) if api_key_file else None), "--api-key-file"
    local = TokenTable.from_sources(key, tokens_file) if key or tokens_file else None
    sources = [f"the key it was started with ({given})"] if key else []
    if tokens_file:
        sources.append("a token of its --tokens-file")
    if hub:
        from .hub_auth import HubTokens

        sources.append("a JupyterHub API token allowed to access this service")
        return KeySetup(HubTokens(local=local), source=" or ".join(sources))
    if local is not None:
        return KeySetup(local, source=" or ".join(sources))
    return KeySetup(TokenTable.from_sources(generate_key_file(default_key_file)), default_key_file,
                    "the key in the file whose path this server printed at start")


def hub_route_prefix(args) -> str:
    """Under `--hub`, the Hub's public proxy forwards `<prefix>/v1/...` as it is: route that too."""
    if not args.hub:
        return ""
    from .hub_auth import service_prefix

    return service_prefix()


def default_key_path(port: int, uds: str | None) -> Path:
    home = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".lightllm-nb")
    return home / ("lightllm-nb-api-key-" + (Path(uds).name if uds else str(port)))


def api_server_count(requested: int | str, cores: int | None = None) -> int:
    """`--api-server-count`, with `auto` resolved for this host (`cores`: the CPUs this process may use)."""
    if requested != "auto":
        return requested
    if cores is None:
        cores = usable_cpus()
    can_split = importlib.util.find_spec("zmq") is not None and can_watch_child_processes()
    return auto_api_server_count(cores, can_split)


def auto_api_server_count(cores: int, can_split: bool) -> int:
    """Two front-end processes where the host has cores to spare for them: on an H200 host (16
    cores) they took the HTTP path from 72% to 135% of the embedded engine's throughput, four gave
    109% (bench/RESULTS.md). On a small machine (CI's 2 cores, or a container whose CPU quota is
    that small) their CPU is the step's CPU; and without pyzmq (the link to them) or pidfds (how
    the engine watches them: Linux 5.3+) they cannot run: there the front end stays in the engine's
    process."""
    return 2 if cores >= 8 and can_split else 0


def listening_sockets(host: str, port: int, uds: str | None) -> list[socket.socket]:
    from tornado.netutil import bind_sockets, bind_unix_socket

    if uds:
        return [bind_unix_socket(uds, mode=0o600)]
    return bind_sockets(port, address=host)


def run_host(args, engine_factory) -> int:
    """Serve until SIGTERM/SIGINT. `engine_factory()` loads the model (after every cheap check)."""
    from .driver import DriverLoop
    from .http_app import ServingContext
    from .metrics import ServingMetrics
    from .served_model import ServedModel

    keys = resolve_tokens(args.api_key, args.api_key_file, args.tokens_file, default_key_path(args.port, args.uds),
                          args.hub)
    sockets = listening_sockets(args.host, args.port, args.uds)  # a busy port fails before the slow load
    engine = engine_factory()
    model = ServedModel.of(engine, args.served_model_name or args.model)
    # The loaded process (torch, the tokenizer, the engine: ~10^5-10^6 objects) lives as long as the
    # process. Frozen, a full garbage collection walks only what came after, instead of stalling
    # the step thread and the HTTP loop for the whole heap every few seconds under load.
    gc.collect()
    gc.freeze()
    route_prefix = hub_route_prefix(args)
    where = f"unix:{args.uds}" if args.uds else f"http://{args.host}:{sockets[0].getsockname()[1]}"
    if route_prefix:
        where += f" (and under {route_prefix}/ for the Hub's proxy)"
    if keys.generated_key_file:
        print(f"lightllm-nb serve: API key written to {keys.generated_key_file} (mode 0600)", flush=True)
    try:
        if args.api_server_count:
            from .api_servers import run_split

            return run_split(args, engine, model, keys, route_prefix, sockets, where)
        driver = DriverLoop(engine, max_waiting=args.max_waiting, max_waiting_per_user=args.max_waiting_per_user)
        ctx = ServingContext(driver, model, keys.tokens, ServingMetrics(model.name), route_prefix=route_prefix,
                             token_source=keys.source)
        print(f"lightllm-nb serve: model {model.name!r} listening on {where}", flush=True)
        asyncio.run(serve_http(ctx, sockets, args.shutdown_timeout))
    finally:
        engine.close()
        gc.unfreeze()  # so that exiting finalizes what start-up made (frozen cycles never are)
    return 0


async def serve_http(ctx, sockets, shutdown_timeout: float) -> None:
    """The tornado app on `sockets` until SIGTERM/SIGINT, then a graceful stop of its requests."""
    from tornado.httpserver import HTTPServer

    from .http_app import make_app

    server = HTTPServer(make_app(ctx), max_body_size=MAX_HTTP_BODY, xheaders=False)
    server.add_sockets(sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: new requests get a 503; %d in flight get %.0f s to finish", len(ctx.active),
             shutdown_timeout)
    # The listening socket stays open through the drain: a new request gets a 503 that says the
    # server is shutting down (a client or balancer retries elsewhere), not a refused connection.
    ctx.stopping = True
    deadline = time.monotonic() + shutdown_timeout
    while ctx.active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for ws in list(ctx.sockets):
        ws.close()
    server.stop()  # before the driver stops: a request that came later could not be answered
    # Finishes whatever is left with reason "abort"; their handlers then answer and return.
    await ctx.driver.ashutdown()
    deadline = time.monotonic() + 5
    while ctx.active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(server.close_all_connections(), 5)
    except asyncio.TimeoutError:
        log.warning("some connections did not close within 5 s; exiting anyway")
    ctx.checks.shutdown(wait=False, cancel_futures=True)  # checks still queued have nobody to answer
    log.info("stopped")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
