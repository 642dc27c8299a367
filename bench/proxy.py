"""Overhead of the Jupyter Server extension's proxy: the same concurrent streams sent to the engine
host directly and through `/lightllm/` on a Jupyter server, alternating, on one engine.

    python bench/proxy.py --device cpu --streams 64 --max-tokens 32        # the demo model on CPU
    python bench/proxy.py --device cuda --model /path/to/Llama-3.2-1B --streams 64 --max-tokens 256
    python bench/proxy.py --device cuda --shape llama-1b --tokenizer DIR --streams 64 --max-tokens 256
    python bench/proxy.py --stub-step-ms 3 --streams 64 --max-tokens 256      # the proxy alone, no model
    python bench/proxy.py --mode steady --requests 4 ...                      # 64 clients, closed loop

Starts `jupyter server` with the extension (which starts `lightllm-nb serve`), then runs `--rounds`
pairs (direct, proxied) of `--streams` concurrent SSE streams and prints, for each path (median and
range over the rounds) and their difference: the time to the response head (the engine host sends
it once it has taken the request, so through the proxy the wait in the Jupyter server shows here),
TTFT p50/p99, output tok/s and the Jupyter server's CPU time per request. Two ways to be concurrent:
`--mode burst` (the default) sends all `--streams` requests at once: how a notebook's thread pool
starts a batch, and the worst case for the proxy, whose one thread takes every request's head in a
row before the first event. `--mode steady` runs `--streams` clients, each sending its next request
as soon as its last one ended (closed loop, what serving benchmarks call concurrency, e.g. vLLM's
`--max-concurrency`), `--warmup-requests` + `--requests` each: TTFT over the requests after the
warm-up, tok/s over the window with every client measured and in flight. Then `--probes` lone
streams, one at a time, the paths alternating: the proxy's own latency per request, without a
burst's queueing (64 requests at once wait in line on the Jupyter server's one thread).
`--cprofile FILE` profiles the Jupyter server's thread during the extension's batches. `--shape` serves random bf16 weights of that shape
(bench/roofline.SHAPES), written as a Hugging Face folder with the tokenizer
from `--tokenizer` into a temporary directory (on the GPU: the weights are made there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import SHAPES  # noqa: E402

PROMPTS = ["Write a story about a lighthouse keeper.", "Explain how a GPU runs many threads at once.",
           "List ten fruits and their colors.", "Describe the water cycle in detail.",
           "What makes a good cup of tea?", "Summarize the history of the printing press."]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_stub_engine_host(sock: socket.socket, step_ms: float, nodelay: bool) -> None:
    """`POST /api/generate` as the engine host streams it (head at once, then `max_tokens` events of
    one token each), every stream's next event written on one shared tick every `step_ms`; the
    first tick comes `step_ms` after a request that finds no stream running (a lone request's
    TTFT is then its head's time plus one step, not plus wherever a free-running tick was).
    `nodelay`: Nagle's algorithm off for each stream, as the engine host does (generation_routes.py):
    on a kept connection Nagle holds an event back until the reader acknowledges the last one."""
    from tornado import web
    from tornado.httpserver import HTTPServer

    streaming: set[web.RequestHandler] = set()
    woken = asyncio.Event()

    class Generate(web.RequestHandler):
        async def post(self) -> None:
            self.left = json.loads(self.request.body)["sampling"]["max_tokens"]
            self.ended = asyncio.get_running_loop().create_future()
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("X-Request-Id", secrets.token_hex(8))
            if nodelay:
                self.request.connection.stream.set_nodelay(True)
            self.flush()
            streaming.add(self)
            woken.set()
            await self.ended

        def on_connection_close(self) -> None:
            streaming.discard(self)
            if not self.ended.done():
                self.ended.set_result(None)

    async def step() -> None:
        loop = asyncio.get_running_loop()
        next_step = loop.time()
        while True:  # steps start every step_ms, as an engine's would, however long writing took
            if not streaming:  # an idle engine starts a step (the prefill) as soon as a request comes
                woken.clear()
                await woken.wait()
                next_step = loop.time()
            next_step = max(next_step + step_ms / 1000, loop.time())
            await asyncio.sleep(next_step - loop.time())
            for stream in list(streaming):
                stream.left -= 1
                event = {"text": "x", "token_ids": [stream.left], "finished": not stream.left}
                stream.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                if stream.left:
                    stream.flush()
                else:
                    streaming.discard(stream)
                    stream.finish()
                    stream.ended.set_result(None)

    async def serve() -> None:
        HTTPServer(web.Application([(r"/api/generate", Generate)])).add_sockets([sock])
        await step()

    asyncio.run(serve())


def start_stub_engine_host(step_ms: float, nodelay: bool = False) -> tuple[multiprocessing.Process, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        sock.setblocking(False)
        process = multiprocessing.get_context("fork").Process(target=run_stub_engine_host,
                                                              args=(sock, step_ms, nodelay),
                                                              daemon=True)
        process.start()  # (the child has its own copy of the listening socket)
        return process, f"http://127.0.0.1:{sock.getsockname()[1]}"


def start_jupyter(workdir: Path, args) -> tuple[subprocess.Popen, str, str]:
    token, port = secrets.token_hex(16), free_port()
    config_dir = workdir / "config"
    config_dir.mkdir()
    # Only our extension: the bench measures our proxy, not other extensions' start-up work. Enabled
    # here too, for a checkout on PYTHONPATH that pip never installed (the GPU machine).
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(
        {"ServerApp": {"jpserver_extensions": {"jupyter_lsp": False, "jupyter_server_terminals": False,
                                               "lightllm_nb.server_ext": True}}}))
    if args.cprofile:
        (config_dir / "jupyter_server_config.py").write_text(PROFILER_CONFIG.format(path=str(Path(args.cprofile).resolve())))
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"), "JUPYTER_CONFIG_DIR": str(config_dir)}
    command = [sys.executable, "-m", "jupyter_server", "--allow-root", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={workdir}",
               "--ServerApp.log_level=WARN"]
    if args.stub_url:
        command += [f"--LightLLM.engine_url={args.stub_url}", "--LightLLM.engine_token=stub"]
    else:
        command += [f"--LightLLM.model={args.model}", f"--LightLLM.device={args.device}"]
    log = open(workdir / "jupyter.log", "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}", token


# Loaded by the Jupyter server as config (so it runs in that process): SIGUSR2 turns a profiler of the
# server's main thread (the IOLoop's: every handler and the relay) on, and off again, writing the
# stats so far. Thread CPU time, not wall clock: the thread's idle waits in epoll count nothing.
PROFILER_CONFIG = """
import cProfile, os, signal, time
_profile = cProfile.Profile(time.thread_time)
_on = [False]
def _toggle(*_):
    if _on[0]:
        _profile.disable()
        _profile.dump_stats({path!r} + ".part")
        os.replace({path!r} + ".part", {path!r})
    else:
        _profile.enable()
    _on[0] = not _on[0]
signal.signal(signal.SIGUSR2, _toggle)
"""


def toggle_profiler(pid: int, path: str | None, *, dumping: bool) -> None:
    """Turns the Jupyter server's profiler on or (`dumping`) off, and waits for the stats it writes."""
    if path is None:
        return
    before = os.stat(path).st_mtime_ns if dumping and os.path.exists(path) else None
    os.kill(pid, signal.SIGUSR2)
    while dumping and (not os.path.exists(path) or os.stat(path).st_mtime_ns == before):
        time.sleep(0.05)


def wait_ready(url: str, token: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> dict:
    """The extension's status once its engine host is up. The log goes with the temporary directory,
    so a failure prints its end (on the GPU machine nothing else is left to read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"jupyter server exited:\n{log.read_text()[-4000:]}")
        try:
            status = httpx.get(f"{url}/lightllm/status", headers={"Authorization": f"token {token}"}).json()
            if status["state"] in ("ready", "external"):  # (external: the stub engine host)
                return status
            if status["state"] == "crashed":  # the supervisor would retry for ever; a bench should not
                break
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    sys.exit(f"the engine host did not become ready:\n{log.read_text()[-4000:]}")


class StreamingConnection(asyncio.BufferedProtocol):
    """The bench's client: one kept-alive HTTP/1.1 connection that streams SSE responses, one request
    at a time. httpx's layers cost ~70 us of this box's CPU per event, so 64 streams at one event per
    3 ms took a whole core and the client, not either path, set the pace (direct: 13k tok/s of the
    stub's 21k); here an event costs a few `find`s and its `json.loads`."""

    def __init__(self):
        self.transport = None
        self.received = b""
        self.sse = b""
        self.record: dict | None = None
        self.done: asyncio.Future | None = None
        # recv_into a buffer used again: a plain Protocol's recv(256 KiB) allocates that much a read
        # (12 us a read in a fresh process on this box, where malloc still maps so large a block).
        self.read_buffer = memoryview(bytearray(65536))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.read_buffer[:nbytes]))

    @classmethod
    async def open(cls, url: str) -> StreamingConnection:
        parts = urlsplit(url)
        _, connection = await asyncio.get_running_loop().create_connection(cls, parts.hostname, parts.port)
        return connection

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"the server closed the connection mid-response ({exc})"))

    async def stream(self, url: str, headers: dict, body: bytes, start: float | None = None) -> dict:
        """One request's times (perf_counter): start, head, first token, end, and each event's tokens.
        The engine host sends the head when it has taken the request, so through the proxy the time
        to it is also how long the request waited in the Jupyter server."""
        parts = urlsplit(url)
        lines = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
                 f"Content-Length: {len(body)}"] + [f"{name}: {value}" for name, value in headers.items()]
        self.record = {"start": start or time.perf_counter(), "head": None, "first": None, "end": None, "events": []}
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await self.done
        return self.record

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buffer = self.received + data
        if self.record["head"] is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.received = buffer
                return
            head, buffer = buffer[:end], buffer[end + 4:]
            if b" 200 " not in head.split(b"\r\n", 1)[0] or b"transfer-encoding: chunked" not in head.lower():
                self.done.set_exception(RuntimeError(f"not a chunked 200 response: {head[:300]!r} {buffer[:300]!r}"))
                return
            self.record["head"] = now
        pos = 0
        while (line_end := buffer.find(b"\r\n", pos)) >= 0:
            size = int(buffer[pos:line_end].split(b";")[0], 16)
            if size == 0:  # the last chunk (no trailers from our servers): the response has ended
                if len(buffer) < line_end + 4:
                    break
                self.record["end"] = now
                self.received, self.sse = buffer[line_end + 4:], b""
                self.done.set_result(None)
                return
            if len(buffer) < line_end + 4 + size:
                break
            self._events(buffer[line_end + 2:line_end + 2 + size], now)
            pos = line_end + 4 + size
        self.received = buffer[pos:]

    def _events(self, payload: bytes, now: float) -> None:
        *events, self.sse = (self.sse + payload).split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: "):
                continue
            parsed = json.loads(event[6:])
            if "error" in parsed:
                self.done.set_exception(RuntimeError(parsed["error"]))
            elif parsed.get("token_ids"):
                self.record["first"] = self.record["first"] or now
                self.record["events"].append((now, len(parsed["token_ids"])))

    def close(self) -> None:
        self.transport.close()


def request_body(prompt: str, max_tokens: int) -> bytes:
    return json.dumps({"prompt": prompt, "stream": True,
                       "sampling": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}}).encode()


async def one_stream(url: str, headers: dict, prompt: str, max_tokens: int) -> dict:
    """One request on a connection of its own (its connecting counts in its times)."""
    start = time.perf_counter()
    connection = await StreamingConnection.open(url)
    try:
        return await connection.stream(url, headers, request_body(prompt, max_tokens), start)
    finally:
        connection.close()


def percentiles(streams: list[dict]) -> dict:
    heads = [s["head"] - s["start"] for s in streams]
    ttfts = sorted(s["first"] - s["start"] for s in streams)
    return {"head_p50_ms": 1000 * statistics.median(heads), "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


async def run_batch(url: str, headers: dict, streams: int, max_tokens: int) -> dict:
    """--mode burst: `streams` requests sent at once; tok/s over the whole batch."""
    start = time.perf_counter()
    results = await asyncio.gather(*(one_stream(url, headers, PROMPTS[i % len(PROMPTS)] + f" ({i})", max_tokens)
                                     for i in range(streams)))
    wall = time.perf_counter() - start
    return {**percentiles(results), "tok_s": sum(n for r in results for _, n in r["events"]) / wall,
            "requests": streams}


async def run_steady(url: str, headers: dict, clients: int, max_tokens: int, requests: int, warmup: int) -> dict:
    """--mode steady: `clients` each send `warmup` + `requests` requests on a kept connection, the
    next as soon as the last has ended. TTFT over the requests after the warm-up; tok/s over the
    window in which every client is past its warm-up and none has finished: `clients` streams in
    flight throughout."""
    async def one_client(i: int) -> list[dict]:
        connection = await StreamingConnection.open(url)
        try:
            return [await connection.stream(url, headers, request_body(PROMPTS[(i + j) % len(PROMPTS)] +
                                                                       f" ({i}.{j})", max_tokens))
                    for j in range(warmup + requests)]
        finally:
            connection.close()

    runs = await asyncio.gather(*(one_client(i) for i in range(clients)))
    window_start = max(run[warmup - 1]["end"] if warmup else run[0]["start"] for run in runs)
    window_end = min(run[-1]["end"] for run in runs)
    if window_end <= window_start:
        sys.exit("--mode steady: no moment had every client past its warm-up and none done; raise --requests")
    tokens = sum(n for run in runs for r in run for t, n in r["events"] if window_start <= t <= window_end)
    return {**percentiles([r for run in runs for r in run[warmup:]]), "tok_s": tokens / (window_end - window_start),
            "requests": clients * (warmup + requests)}


def random_model_folder(shape: str, tokenizer: str, workdir: Path) -> str:
    """A Hugging Face folder of random bf16 weights of `shape`, made the way bench/serving.py makes it."""
    from serving import write_random_model

    folder = workdir / f"random-{shape}"
    folder.mkdir()
    write_random_model(shape, tokenizer, folder)
    return str(folder)


def spread(rounds: list[dict], key: str) -> str:
    values = [r[key] for r in rounds]
    return f"{statistics.median(values):8.1f} [{min(values):.1f}-{max(values):.1f}]"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (Linux), not counting its children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def direct_path(url: str, token: str, process: subprocess.Popen, workdir: Path, args) -> tuple[str, dict]:
    """Where and how the bench calls the engine host without the extension."""
    status = wait_ready(url, token, process, workdir / "jupyter.log")
    if args.stub_url:
        return f"{args.stub_url}/api/generate", {}
    tokens_file = next((workdir / "runtime").glob("lightllm-tokens-*.json"))
    proxy_token = next(iter(json.loads(tokens_file.read_text())))
    user = httpx.get(f"{url}/lightllm/api/stats", headers={"Authorization": f"token {token}"}).json()["user"]
    # The same engine user both ways, so both see the same prefix-cache scope and limits.
    return (f"{status['engine_url']}/api/generate",
            {"Authorization": f"Bearer {proxy_token}", "X-LightLLM-User": user["name"]})


def timed_batch(path: tuple[str, dict], args, jupyter_pid: int, *, profiled: bool = False) -> dict:
    """One batch of streams, plus the Jupyter server's CPU time per stream: a cost of the proxy that
    a loaded machine does not blur (its wall-clock share of the cores is what it cannot control).
    `profiled`: under --cprofile's profiler (which slows the server's thread: not a timing to report)."""
    profile = args.cprofile if profiled else None
    toggle_profiler(jupyter_pid, profile, dumping=False)
    before = cpu_seconds(jupyter_pid)
    if args.mode == "burst":
        result = asyncio.run(run_batch(*path, args.streams, args.max_tokens))
    else:
        result = asyncio.run(run_steady(*path, args.streams, args.max_tokens, args.requests, args.warmup_requests))
    toggle_profiler(jupyter_pid, profile, dumping=True)
    requests = result.pop("requests")
    return {**result, "jupyter_cpu_ms_per_stream": 1000 * (cpu_seconds(jupyter_pid) - before) / requests}


def latency_probes(paths: dict, probes: int) -> dict[str, list[float]]:
    """TTFT (ms) of `probes` lone streams per path, sent one after another, the paths alternating."""
    ttfts = {name: [] for name in paths}
    for _ in range(probes):
        for name, (target, headers) in paths.items():
            ttfts[name].append(asyncio.run(run_batch(target, headers, 1, 2))["ttft_p50_ms"])
    return ttfts


def overhead(direct: dict, proxied: dict) -> str:
    return (f"{proxied['head_p50_ms'] - direct['head_p50_ms']:+.1f} ms head p50, "
            f"{proxied['ttft_p50_ms'] - direct['ttft_p50_ms']:+.1f} ms TTFT p50, "
            f"{proxied['ttft_p99_ms'] - direct['ttft_p99_ms']:+.1f} ms p99, "
            f"{100 * (proxied['tok_s'] / direct['tok_s'] - 1):+.1f}% tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="what `serve --model` takes (ignored with --shape)")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES),
                        help="random bf16 weights of this shape instead of --model (needs CUDA)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=["burst", "steady"], default="burst",
                        help="burst: --streams requests at once; steady: --streams clients, each sending its next "
                             "request when the last ends (closed loop, as vLLM's --max-concurrency)")
    parser.add_argument("--requests", type=int, default=4, help="--mode steady: measured requests per client")
    parser.add_argument("--warmup-requests", type=int, default=1,
                        help="--mode steady: requests per client before the measured ones")
    parser.add_argument("--probes", type=int, default=16, help="lone streams per path for the per-request latency")
    parser.add_argument("--stub-step-ms", type=float, default=None, metavar="MS",
                        help="a stub engine host that writes every stream's next event each MS ms, instead of a model")
    parser.add_argument("--stub-nagle", action="store_true",
                        help="the stub engine host leaves Nagle's algorithm on for its streams (as the engine host "
                             "did before it turned it off)")
    parser.add_argument("--cprofile", default=None, metavar="FILE",
                        help="profile the Jupyter server's thread (thread CPU time) during the extension's batches "
                             "into FILE (pstats) and print its top functions; the timings are then not the proxy's")
    args = parser.parse_args()
    args.stub_url = None
    if args.shape and (not args.tokenizer or args.device == "cpu"):
        parser.error("--shape needs --tokenizer DIR and a CUDA device (its random weights are made on the GPU)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            args.model = random_model_folder(args.shape, args.tokenizer, Path(tmp))
        stub = None
        if args.stub_step_ms is not None:
            stub, args.stub_url = start_stub_engine_host(args.stub_step_ms, not args.stub_nagle)
        process, url, token = start_jupyter(Path(tmp), args)
        try:
            paths = {"direct": direct_path(url, token, process, Path(tmp), args),
                     "extension": (f"{url}/lightllm/api/generate", {"Authorization": f"token {token}"})}
            for target, headers in paths.values():  # warm-up: first-call costs, caches, connection pools
                asyncio.run(run_batch(target, headers, args.streams, 4))
            runs = {name: [] for name in paths}
            for i in range(args.rounds):
                # ABBA order: a load that drifts during a round (other processes, caches) hits both paths alike.
                for name in (list(paths) if i % 2 == 0 else list(paths)[::-1]):
                    runs[name].append(timed_batch(paths[name], args, process.pid, profiled=name == "extension"))
                print(f"round {i + 1}: proxy adds {overhead(runs['direct'][-1], runs['extension'][-1])}", flush=True)
            probes = latency_probes(paths, args.probes)
        finally:
            process.terminate()
            process.wait(60)
            if stub is not None:
                stub.terminate()
    engine = (f"a stub engine host, one event per stream every {args.stub_step_ms} ms"
              + (", Nagle on" if args.stub_nagle else "") if stub is not None
              else f"model {args.shape or args.model} on {args.device}")
    load = (f"a burst of {args.streams} streams sent at once" if args.mode == "burst" else
            f"{args.streams} clients in a closed loop, {args.warmup_requests} + {args.requests} requests each")
    print(f"{load} x {args.max_tokens} tokens, {engine}, {args.rounds} rounds each, "
          "interleaved (median [min-max] of rounds)")
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for name, rs in runs.items():
        print(f"  {name:9s}  head p50 {spread(rs, 'head_p50_ms')} ms  TTFT p50 {spread(rs, 'ttft_p50_ms')} ms  "
              f"p99 {spread(rs, 'ttft_p99_ms')} ms  {spread(rs, 'tok_s')} tok/s  "
              f"Jupyter server CPU {spread(rs, 'jupyter_cpu_ms_per_stream')} ms/stream")
    paired = [e["ttft_p50_ms"] - d["ttft_p50_ms"] for d, e in zip(runs["direct"], runs["extension"])]
    print(f"  proxy adds {overhead(summary['direct'], summary['extension'])} (medians); "
          f"TTFT p50 paired by round: median {statistics.median(paired):+.1f} ms")
    if args.probes:
        alone = [e - d for d, e in zip(probes["direct"], probes["extension"])]
        print(f"  1 stream at a time, {args.probes} each: direct TTFT {statistics.median(probes['direct']):.1f} ms, "
              f"extension {statistics.median(probes['extension']):.1f} ms: proxy adds "
              f"{statistics.median(alone):+.1f} ms per request (median of pairs)")
    if args.cprofile:
        per_round = args.streams * (1 if args.mode == "burst" else args.warmup_requests + args.requests)
        print_profile(args.cprofile, args.rounds * per_round, args)


def print_profile(path: str, requests: int, args) -> None:
    """The profiled thread's top functions, per proxied request and per relayed event."""
    import pstats

    stats = pstats.Stats(path)
    total = stats.total_tt
    print(f"Jupyter server thread under the profiler: {1000 * total / requests:.2f} ms CPU per request, "
          f"{1e6 * total / (requests * args.max_tokens):.1f} us per event (all of it, profiler included)")
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
