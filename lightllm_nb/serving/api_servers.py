"""`serve --api-server-count N`: N HTTP front-end processes and this process, which owns the engine
(as vLLM V1 and LightLLM split them), so that HTTP, JSON and detokenization never hold the GIL the
step loop needs.

The front ends are forked after the model has loaded (they inherit its tokenizer and the listening
sockets, and accept connections in turn) and before the driver loop's thread starts. Each one runs
the same tornado app as one process, on a `RemoteDriver`; this process runs the DriverLoop and an
`EngineCore` on a zmq socket in a private folder. A front end that dies has its requests aborted
(their KV is freed at once); SIGTERM here stops every front end gracefully, then the engine.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

from .driver import DriverLoop
from .engine_core import EngineCore

log = logging.getLogger("lightllm_nb.serve")


def run_split(args, engine, model, keys, route_prefix: str, sockets, where: str) -> int:
    """Serve with `args.api_server_count` front-end processes until SIGTERM/SIGINT; the exit code."""
    folder = tempfile.mkdtemp(prefix="lightllm-nb-core-")
    address = f"ipc://{folder}/engine.sock"
    engine_pid = os.getpid()
    # The children inherit the engine's objects (CUDA tensors on a GPU): their garbage collector must
    # never finalize one, so everything alive now is frozen out of its reach (run_host froze the
    # loaded heap already; this takes what came since). It stays frozen here too, for the same reason
    # run_host froze it: full collections that walk the whole heap stall the step thread.
    gc.collect()
    gc.freeze()
    front_ends = [_fork_front_end(address, sockets, model, keys, route_prefix, args.shutdown_timeout, engine_pid)
                  for _ in range(args.api_server_count)]
    for sock in sockets:  # the front ends accept on them; this process only steps
        sock.close()
    print(f"lightllm-nb serve: model {model.name!r} listening on {where} "
          f"({len(front_ends)} API server processes)", flush=True)
    driver = DriverLoop(engine, max_waiting=args.max_waiting, max_waiting_per_user=args.max_waiting_per_user)
    try:
        return asyncio.run(_run_engine(EngineCore(driver, address, front_ends), front_ends, args.shutdown_timeout))
    finally:
        driver.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def _fork_front_end(address: str, sockets, model, keys, route_prefix: str, shutdown_timeout: float,
                    engine_pid: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        code = asyncio.run(_front_end(address, sockets, model, keys, route_prefix, shutdown_timeout, engine_pid))
    except BaseException:
        log.exception("API server process %d failed", os.getpid())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never the engine process's exit handlers: it owns the engine, not this copy


async def _front_end(address: str, sockets, model, keys, route_prefix: str, shutdown_timeout: float,
                     engine_pid: int) -> int:
    from .host import serve_http
    from .http_app import ServingContext
    from .metrics import ServingMetrics
    from .remote_driver import RemoteDriver

    driver = RemoteDriver(address, model.prompts)
    driver.start()
    ctx = ServingContext(driver, model, keys.tokens, ServingMetrics(model.name), route_prefix=route_prefix,
                         token_source=keys.source)
    watching = asyncio.get_running_loop().create_task(_stop_when_orphaned(engine_pid))
    await serve_http(ctx, sockets, shutdown_timeout)
    watching.cancel()
    return 0


async def _stop_when_orphaned(engine_pid: int) -> None:
    """An engine process that died cannot answer: stop (gracefully) rather than hang every stream."""
    while os.getppid() == engine_pid:
        await asyncio.sleep(1)
    log.error("the engine process %d is gone: this API server stops", engine_pid)
    os.kill(os.getpid(), signal.SIGTERM)


async def _run_engine(core: EngineCore, front_ends: list[int], shutdown_timeout: float) -> int:
    loop = asyncio.get_running_loop()
    serving = loop.create_task(core.serve())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    alive: dict[int, int] = {}  # pid -> pidfd (readable once the process has exited)

    def exited(pid: int) -> None:
        fd = alive.pop(pid)
        loop.remove_reader(fd)
        os.close(fd)
        _, status = os.waitpid(pid, 0)
        aborted = core.front_end_gone(str(pid).encode())
        if not stop.is_set():
            log.error("API server process %d died (wait status %d); %d of its requests aborted", pid, status, aborted)
        if not alive:
            stop.set()

    for pid in front_ends:
        alive[pid] = os.pidfd_open(pid)
        loop.add_reader(alive[pid], exited, pid)
    await stop.wait()
    unexpected = not alive  # every front end died on its own: a failure, not a stop
    log.info("stopping: %d API server processes drain (up to %.0f s)", len(alive), shutdown_timeout)
    for pid in alive:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + shutdown_timeout + 15
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for pid in list(alive):
        log.warning("API server process %d did not stop in time: killed", pid)
        os.kill(pid, signal.SIGKILL)
    while alive:
        await asyncio.sleep(0.05)
    serving.cancel()
    await core.driver.ashutdown()
    log.info("stopped")
    return 1 if unexpected else 0
