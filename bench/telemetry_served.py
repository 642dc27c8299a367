"""`bench/telemetry_overhead.py --served`: what event websocket subscribers cost the steps of
`lightllm-nb serve` (issue 8), measured by the engine itself.

`--batch` closed-loop clients keep that many requests decoding (`--context` random prompt tokens,
`--output-len` tokens each, not streamed, so the load costs the server little). A probe (the
operator's websocket, every step) reads each StepEvent's `duration`: the engine's own step time.
Each round times the probe alone and with 8 more websocket subscribers at every step (8 users, the
first also taking the page map), in alternating order; only steps whose batch is `--batch` decodes
count (no prefill chunk). Beside it, the CPU time per step (from /proc, all steps of the window) of
the engine process's threads and of the API server processes: on a machine with fewer cores than
processes, the readers' work elsewhere slows the step by taking cores, which the engine process's
own CPU per step does not blur. With `--api-server-count N >= 1` the engine keeps one subscription per
front end whatever the readers; with 0 it holds one per reader (the in-process baseline).
`--viewer-rate N` makes the 8 readers rate-capped (`?rate=N`), as the panels subscribe.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from serving import BENCH_KEY, serve_cpu_seconds, start_serve, write_random_model

from lightllm_nb.serving.http_client import HTTPEventSubscription


def run_served(args, extra: int, target: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-telemetry-served-"))
    model = args.model or "demo"
    if args.shape:
        model = str(work / "model")
        Path(model).mkdir()
        write_random_model(args.shape, args.tokenizer, Path(model))
    viewers = {f"viewer{i}-token-0123456": {"user": f"viewer{i}"} for i in range(extra)}
    (work / "tokens.json").write_text(json.dumps(viewers))
    serve_args = ["--device", args.device, "--seed", "0", "--log-level", "warning",
                  "--tokens-file", str(work / "tokens.json"), "--api-server-count", str(args.api_server_count),
                  "--max-num-seqs", str(args.batch), "--max-num-batched-tokens", str(max(2048, args.batch))]
    if args.kv_tokens:
        serve_args += ["--kv-tokens", str(args.kv_tokens)]
    process, host, port = start_serve(model, serve_args, work / "serve.log")
    url = f"http://{host}:{port}"
    stop = threading.Event()
    try:
        load = [threading.Thread(target=_closed_loop_client, args=(url, args, seed, stop), daemon=True)
                for seed in range(args.batch)]
        for client in load:
            client.start()
        steps, dropped, engine_subscriptions, cpu = _probe_rounds(url, process.pid, args, list(viewers), extra)
    finally:
        stop.set()
        process.terminate()
        process.wait(120)
    _report(args, steps, dropped, engine_subscriptions, cpu, extra, target)


def _closed_loop_client(url: str, args, seed: int, stop: threading.Event) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        body = {"prompt_token_ids": [rng.randrange(3, 1000) for _ in range(args.context)], "stream": False,
                "sampling": {"max_tokens": args.output_len, "ignore_eos": True, "temperature": 0}}
        try:
            _post(url + "/api/generate", body)
        except OSError:  # the server is stopping
            return


def _post(url: str, body: dict) -> dict:
    headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.loads(response.read())


def _stats(url: str) -> dict:
    request = urllib.request.Request(url + "/api/stats", headers={"Authorization": f"Bearer {BENCH_KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _subscribe(url: str, token: str, **options) -> HTTPEventSubscription:
    """`HTTPClient(url, token).subscribe(...)` without httpx, which the GPU machine may not have."""
    return HTTPEventSubscription(url, {"Authorization": f"Bearer {token}"}, **options)


def _drain(subscription, into: list | None) -> None:
    for event in subscription:
        if into is not None:
            into.append((time.monotonic(), event))


def _probe_rounds(url: str, pid: int, args, tokens: list[str], extra: int):
    """Per setting (0 or `extra` more subscribers): full-batch decode step durations, events the
    extra readers lost, the engine's event subscriptions while they read, and CPU seconds per step
    of the serve process's parts."""
    probe = _subscribe(url, BENCH_KEY, pages=False, maxsize=1_000_000, max_rate=None)
    seen: list = []
    threading.Thread(target=_drain, args=(probe, seen), daemon=True).start()
    deadline = time.monotonic() + 600
    while not any(_full_decode(e, args.batch) for _, e in seen):  # the load is up: every row decoding
        if time.monotonic() > deadline:
            raise RuntimeError("the engine never ran a full decode batch: is --batch larger than the KV pool holds?")
        time.sleep(0.2)
    steps = {0: [], extra: []}
    dropped = {0: {"server": 0, "reader": 0}, extra: {"server": 0, "reader": 0}}
    engine_subscriptions = {0: set(), extra: set()}
    cpu = {0: [], extra: []}
    for round_ in range(args.rounds):
        for count in (0, extra) if round_ % 2 == 0 else (extra, 0):
            readers = _Readers(url, tokens[:count], args.viewer_rate)
            time.sleep(1.0)  # joined and settled
            started, cpu_before = time.monotonic(), serve_cpu_seconds(pid)
            time.sleep(args.seconds / 2)
            engine_subscriptions[count].add(_stats(url)["event_subscriptions"])
            time.sleep(args.seconds / 2)
            ended, cpu_after = time.monotonic(), serve_cpu_seconds(pid)
            window = [e for t, e in list(seen) if started <= t <= ended]
            steps[count].append([e.duration for e in window if _full_decode(e, args.batch)])
            cpu[count].append({part: (cpu_after[part] - cpu_before.get(part, 0.0)) / max(1, len(window))
                               for part in cpu_after})
            for where, lost in zip(("server", "reader"), readers.close()):
                dropped[count][where] += lost
    probe.close()
    return steps, dropped, engine_subscriptions, cpu


class _Readers:
    """Websocket readers (the first also takes pages) in a process of their own, as other notebooks
    are: their JSON parsing must not slow the probe's, or drops would be the bench's own."""

    def __init__(self, url: str, tokens: list[str], max_rate: float | None):
        context = multiprocessing.get_context("spawn")  # this process has threads: no fork
        self._stop, child_end = context.Pipe()
        self._process = context.Process(target=_read_until_told, args=(url, tokens, max_rate, child_end), daemon=True)
        self._process.start()
        self._stop.recv()  # all subscribed

    def close(self) -> tuple[int, int]:
        """Events lost (server side: the reader's queue in serve; reader side: in its own process)."""
        self._stop.send(None)
        lost = self._stop.recv()
        self._process.join(30)
        return lost


def _read_until_told(url: str, tokens: list[str], max_rate: float | None, pipe) -> None:
    readers = [_subscribe(url, token, pages=i == 0, maxsize=4096, max_rate=max_rate) for i, token in enumerate(tokens)]
    for reader in readers:
        threading.Thread(target=_drain, args=(reader, None), daemon=True).start()
    pipe.send("subscribed")
    pipe.recv()
    server = sum(r.remote_dropped for r in readers)
    pipe.send((server, sum(r.dropped for r in readers) - server))
    for reader in readers:
        reader.close()


def _full_decode(event, batch: int) -> bool:
    return len(event.rows) == batch and all(r.phase == "decode" for r in event.rows)


def _report(args, steps: dict, dropped: dict, engine_subscriptions: dict, cpu: dict, extra: int,
            target: float) -> None:
    rate = "every step" if args.viewer_rate is None else f"{args.viewer_rate:g}/s"
    print(f"\nlightllm-nb serve --api-server-count {args.api_server_count}, {args.shape or args.model or 'demo'} on "
          f"{args.device}, batch {args.batch}, context {args.context}, extra readers at {rate}: the probe's median "
          f"full-batch decode step (StepEvent.duration), {args.rounds} interleaved rounds of {args.seconds:.0f} s")
    print(f"{'extra subscribers':>17} | {'engine subscriptions':>20} | {'steps':>6} | {'step ms':>8} | "
          f"{'vs 0':>6} | {'dropped (serve, reader)':>23} | step ms, each round")
    medians = {count: statistics.median([d for r in rounds for d in r]) for count, rounds in steps.items()}
    for count, rounds in steps.items():
        each = " ".join(f"{statistics.median(r) * 1e3:.3f}" if r else "-" for r in rounds)
        print(f"{count:>17} | {','.join(map(str, sorted(engine_subscriptions[count]))):>20} | "
              f"{sum(map(len, rounds)):>6} | {medians[count] * 1e3:8.3f} | {medians[count] / medians[0]:6.3f} | "
              f"{dropped[count]['server']:>15}, {dropped[count]['reader']:>6} | {each}")
    print(f"target (issue 8): {extra} subscribers at most {target:.2f} x the step with none")
    print("serve CPU ms per step (median of rounds):")
    for count, rounds in cpu.items():
        parts = {part: statistics.median(r.get(part, 0.0) for r in rounds) * 1e3 for r in rounds for part in r}
        print(f"  {count} extra subscribers: " + ", ".join(
            f"{part} {ms:.2f}" for part, ms in parts.items() if not part.startswith(" ")))
        print("    other threads by name: " + ", ".join(
            f"{part.strip()} {ms:.2f}" for part, ms in sorted(parts.items()) if part.startswith(" ") and ms >= 0.005))
