"""The engine: requests in, tokens out, one scheduler step at a time.

The low-level API (`add_request` / `step` / `abort`) belongs to one thread. Until a driver loop
starts, that is whoever calls it (single-threaded scripts and tests); from the first `generate`,
`stream`, `chat` or `client()` on, the engine's own driver loop thread owns it, and every other
thread goes through a thread-safe `LocalClient` (`engine.client(user=...)`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from typing import Sequence

import torch

from ..scheduling.admission import AdmissionPolicy
from ..scheduling.decisions import Decision
from .arguments import check_batch_limits, check_engine_args
from .detokenizer import IncrementalDetokenizer
from .embedded_api import EmbeddedAPI
from .step_outputs import StepOutputs
from .grammar import GrammarCompiler, RequestGrammar
from .engine_setup import (choose_batch_limits, cpu_threads_per_rank, limit_cpu_threads, resolve_device, resolve_dtype,
                           size_kv_tokens)
from .inflight import InflightTokens
from ..models.kernel_set import kernels_for
from ..host_cpus import usable_cpus
from ..kv.cache_scope import CacheScopes, check_scope_settings, tokenize_shared_prefixes
from ..kv.kv_pool import KVPool
from ..loading import Checkpoint, load_checkpoint
from .model_runner import ModelRunner
from ..scheduling.policies import make_policy
from ..models.config import ModelConfig
from ..models.weights import build_model
from .prompt_checks import PromptEncoder, check_fits, check_user_and_priority, prompt_ids, sampling_params
from ..scheduling.request import Request, RequestOutput
from .sampler import RequestSampler, Sampler
from ..sampling_params import InvalidRequestError, SamplingParams
from ..scheduling.scheduler import Scheduler
from ..scheduling.timeline import TimelineRecorder
from ..telemetry.step_rows import batch_rows
from ..telemetry.step_totals import StepTotals
from ..telemetry.hub import EventHub

log = logging.getLogger(__name__)


class Engine(EmbeddedAPI, StepOutputs):
    """A model, its KV cache and its scheduler: requests in, tokens out.

    `model`: "demo", a Hugging Face folder, a .gguf file or a Checkpoint; `device` "auto" is CUDA if
    there is one. Every argument is checked before the model loads. `kv_tokens`: KV cache size
    (default: `kv_memory_fraction` of free GPU memory, 1 GiB on the CPU), in pages of `page_size`.

    `max_running` (requests in a batch) and `max_batch_tokens` (tokens a step) left unset are chosen
    (`stats()` shows them; engine_setup.choose_batch_limits has the measurements). GPU: running =
    the pool's tokens / 1024, a power of two in [8, 256]; tokens = 32 per running request in [2048,
    16384]. CPU: tokens = what its cores prefill in about a second (256 for the demo model on 2
    cores; in [16, 2048]): other streams wait seconds, not tens of seconds, behind a long prompt; running =
    tokens / 8, at most the pool's tokens / 256, in [4, 128]. Never more running than the pool has
    pages; an explicit value of one moves the other's default so that max_batch_tokens >= max_running.

    `generate / stream / chat / client / subscribe` are thread-safe (a driver loop owns the engine
    from their first use); `add_request / step / abort` are the single-threaded low level. `close()`
    (or a `with` block) aborts what runs and frees the model; one still open at exit is closed then.
    """

    def __init__(self, model: str | Checkpoint = "demo", *, device: str = "auto", dtype: str | torch.dtype = "auto",
                 kv_tokens: int | None = None, page_size: int = 1, max_batch_tokens: int | None = None,
                 max_running: int | None = None, scheduler: str | AdmissionPolicy = "past_future", prefix_cache: bool = True,
                 max_running_per_user: int | None = None, seed: int | None = None,
                 kv_memory_fraction: float = 0.85, cuda_graphs: bool = True, overlap: bool | None = None,
                 progress: bool = True, prefix_cache_scope: str = "user", shared_prefixes: Sequence | None = None,
                 tp: int = 1):
        # Every setting is checked before the (slow) model load.
        check_engine_args(dtype=dtype, kv_tokens=kv_tokens, page_size=page_size, max_batch_tokens=max_batch_tokens,
                          max_running=max_running, scheduler=scheduler, max_running_per_user=max_running_per_user,
                          seed=seed, kv_memory_fraction=kv_memory_fraction, tp=tp, model=model)
        check_scope_settings(prefix_cache_scope, shared_prefixes, prefix_cache)  # see kv/cache_scope.py
        self.device = resolve_device(device)
        limit_cpu_threads(self.device)  # a container's CPU quota, not the host's core count
        checkpoint = model if isinstance(model, Checkpoint) else load_checkpoint(model)
        self.config = ModelConfig.from_hf(checkpoint.config)
        self.dtype = resolve_dtype(dtype, self.device, checkpoint.config)
        self.tokenizer = checkpoint.tokenizer
        self.model_name = checkpoint.source
        if tp == 1:
            self.model = build_model(self.config, checkpoint, device=self.device, dtype=self.dtype,
                                     kernels=kernels_for(self.device),
                                     max_positions=self.config.max_position_embeddings, progress=progress)
        else:  # rank 0's shard plus one worker process per other rank (lightllm_nb/parallel)
            from ..parallel.sharded_model import ShardedModel

            self.model = ShardedModel(model, tp, self.device, self.dtype, progress, checkpoint,
                                      cpu_threads=cpu_threads_per_rank(self.device, tp))
        # model.config: this rank's shape (its KV heads), which is what the pool holds.
        kv_tokens = kv_tokens or size_kv_tokens(self.model.config, self.dtype, self.device, kv_memory_fraction)
        capacity = kv_tokens // page_size * page_size  # whole pages only
        max_context = min(self.config.max_position_embeddings, capacity)
        # None: chosen from the device, the model and the pool (the rule is in engine_setup).
        max_running, max_batch_tokens = choose_batch_limits(self.config, self.dtype, self.device, kv_tokens,
                                                            max_running, max_batch_tokens, page_size=page_size,
                                                            cpus=usable_cpus())
        # The pool is sized now: limits it cannot hold are refused before its rows are allocated.
        check_batch_limits(max_running, max_batch_tokens, kv_tokens=kv_tokens, page_size=page_size,
                           max_context=max_context)
        # At tp > 1 the sharded model makes the pool: its workers mirror what rank 0's pool maps.
        self.pool = (KVPool if tp == 1 else self.model.kv_pool)(
                           num_layers=self.config.num_layers, num_kv_heads=self.model.config.num_kv_heads,
                           head_dim=self.config.head_dim, num_tokens=kv_tokens, page_size=page_size,
                           max_requests=max_running, max_context=max_context, dtype=self.dtype, device=self.device)
        self.cache_scopes = CacheScopes(prefix_cache_scope, tokenize_shared_prefixes(shared_prefixes, self.tokenizer))
        self.scheduler = Scheduler(self.pool, make_policy(scheduler), max_batch_tokens=max_batch_tokens,
                                   max_running=max_running, prefix_cache=prefix_cache,
                                   max_running_per_user=max_running_per_user, cache_scopes=self.cache_scopes,
                                   timelines=TimelineRecorder(lambda: self._step + 1))  # the step being run
        # CUDA graphs at tp>1 would need every rank to capture and replay in lockstep: not built yet.
        self.runner = ModelRunner(self.model, self.pool, cuda_graphs=cuda_graphs and tp == 1, max_batch=max_running,
                                  progress=progress)
        generator = torch.Generator(device=self.device)
        # Never torch.seed(): that would reseed the notebook's global RNG.
        generator.manual_seed(seed) if seed is not None else generator.seed()
        self.sampler = Sampler(self.config.vocab_size, self.device, generator=generator)
        self.eos_token_ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.grammars = GrammarCompiler(self.tokenizer, self.config.vocab_size, self.eos_token_ids, self.device)
        # Callers' tokenization, on their own threads with their own tokenizer copy.
        self.prompts = PromptEncoder(self.tokenizer, self.config.vocab_size, self.pool.max_context, self.model_name)
        self._requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._pending: list[RequestOutput] = []   # outputs step() has yet to hand out (aborts)
        self._carried_decisions: list[Decision] = []  # decisions made between steps (aborts)
        self._inflight: InflightTokens | None = None  # the previous overlapped step's tokens
        self._batch: list | None = None  # the running step's (request, tokens), finished with "error" if it raises
        # Overlap only pays where the GPU runs ahead of the host; on the CPU there is nothing to hide.
        self.overlap = overlap if overlap is not None else self.device.type == "cuda"
        self._ids = itertools.count()
        self._events = EventHub()
        self._step = 0
        self._start = time.perf_counter()
        self._totals = StepTotals()  # what every StepEvent counts since this start (step_totals.py)
        self._closed = False
        self._owner: int | None = None   # thread id of the driver loop, once one runs
        self._loop = None                # that DriverLoop (lightllm_nb.serving.driver)
        self._loop_lock = threading.RLock()
        # Collected without close(): its callback threads end. Still open at interpreter exit (finalize
        # runs then too, before Python finalizes its threads): closed, which aborts its requests and
        # joins the driver thread. A driver thread left inside a torch op is otherwise killed by
        # pthread_exit as it takes the GIL back, an unwind through torch's C++ frames that ends in
        # std::terminate ("terminate called without an active exception", SIGABRT, exit code 134).
        weakref.finalize(self, _close_unclosed, weakref.ref(self), self._events)

    # ---- low-level API (one thread) ----------------------------------------------------------
    def add_request(self, prompt: str | None = None, sampling: SamplingParams | dict | None = None, *,
                    prompt_token_ids: Sequence[int] | None = None, user: str = "default", priority: int = 0,
                    request_id: str | None = None, stream_text: bool = False) -> str:
        """Queue a request; returns its id. Its outputs come back from `step()`.
        Raises InvalidRequestError for bad input (nothing is queued)."""
        self._check_caller("add_request")
        sampling = sampling_params(sampling)
        ids = prompt_ids(self.tokenizer, self.config.vocab_size, prompt, prompt_token_ids)
        check_fits(ids, sampling, self.pool.max_context)
        return self.add_prepared(ids, sampling, user=user, priority=priority, request_id=request_id,
                                 stream_text=stream_text)

    def add_prepared(self, ids: list[int], sampling: SamplingParams, *, user: str = "default", priority: int = 0,
                     request_id: str | None = None, stream_text: bool = False) -> str:
        """`add_request` for prompt ids and sampling already checked (by `self.prompts` on the caller's side)."""
        self._check_caller("add_prepared")
        check_user_and_priority(user, priority)
        if request_id is None:
            request_id = next(rid for rid in (f"req-{n}" for n in self._ids) if rid not in self._requests)
        elif request_id in self._requests:
            raise InvalidRequestError(f"request_id={request_id!r} is already in use: pick another or omit it")
        req = Request(request_id, ids, sampling, user=user, priority=priority)
        req.sampler = RequestSampler(sampling, ids, self.device)
        constraint = sampling.constraint  # a large schema's text takes a while to make: once
        if constraint is not None:  # compiles off this thread; the request waits until then
            req.grammar = RequestGrammar(self.grammars.compile(constraint))
        if stream_text or sampling.stop:
            self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, ids, sampling.stop)
        self._requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str, *, user: str | None = None) -> bool:
        """Stop a request now and free its KV slots. False if it is unknown, already done, or (when
        `user` is given) someone else's: the same answer, so ids cannot be probed."""
        self._check_caller("abort")
        req = self._requests.get(request_id)
        if req is None or req.finished or (user is not None and req.user != user):
            return False
        self._carried_decisions.append(self.scheduler.finish(req, "abort"))
        self._pending.append(self._retire(RequestOutput(request_id, [], "", True, "abort")))
        return True

    def abort_all(self) -> list[RequestOutput]:
        """Abort every request (reason "abort") and return all outputs not yet handed out."""
        self._check_caller("abort_all")
        for request_id in list(self._requests):
            self.abort(request_id)
        self._inflight = None  # its requests are finished: their tokens are not wanted
        outputs, self._pending = self._pending, []
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending) or self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """Run one batch: schedule, forward, sample, retire finished requests.

        Overlapped (CUDA, when no request in the batch needs its tokens on the host to sample):
        the step is launched, then the previous step's tokens are read back and handled while
        the GPU computes, so the host's bookkeeping hides behind the GPU's work. A request that
        stopped on a token seen this late has run one wasted step; its extra token is dropped.

        A step that raises finishes its batch's requests with finish_reason "error" (the error
        in `Completion.error`) and frees their KV; everyone else carries on.
        """
        self._check_caller("step")
        outputs, self._pending = self._pending, []
        try:
            self._run_step(outputs)
        except Exception as err:
            log.exception("an engine step failed; its requests finish with reason 'error'")
            self._fail_batch(err, outputs)
        if self._owner is None:
            self._events.flush()  # single-threaded: callbacks have seen this step when step() returns
        return outputs

    def _run_step(self, outputs: list[RequestOutput]) -> None:
        started = time.perf_counter()
        self._batch = None
        batch = self.scheduler.schedule()
        self._batch = batch.items
        decisions = self._carried_decisions + batch.decisions
        self._carried_decisions = []
        # Rows are described only for listeners, and built only when one reads them (step_rows.py).
        rows = batch_rows(batch.items) if self._events else []
        inflight = None
        if batch:
            logits, sampling_reqs, sample_rows = self.runner.run(batch.items)
            for req, n in batch.items:
                req.num_computed += n
            samplers = [r.sampler for r in sampling_reqs]
            if self.overlap and self.sampler.can_defer(samplers):
                mask = None
                if any(r.grammar is not None for r in sampling_reqs):
                    # The mask needs the previous step's tokens accepted: read them back now, while
                    # the GPU runs this forward, and queue the sampling behind the mask.
                    outputs += self._take_inflight(decisions)
                    mask = self._grammar_mask(sampling_reqs, rows, outputs, decisions)
                tokens = self.sampler.sample_on_device(logits, samplers, mask)
                self.runner.remember_tokens(sample_rows, tokens)
                inflight = InflightTokens(sampling_reqs, tokens)
                outputs += self._take_inflight(decisions)
            else:
                outputs += self._take_inflight(decisions)  # penalties must observe the previous token
                sampled = self.sampler.sample(logits, samplers,
                                              self._grammar_mask(sampling_reqs, rows, outputs, decisions))
                now = time.perf_counter()
                for i, req in enumerate(sampling_reqs):
                    if req.finished:  # stopped on the previous step's token, read back just now
                        continue
                    req.token_ids.append(sampled.token_ids[i])
                    outputs.append(self._accept_token(req, len(req.token_ids) - 1, now, sampled, i, decisions))
        else:
            outputs += self._take_inflight(decisions)
            self.grammars.wait_for_pending(timeout=0.05)  # nothing to run until a grammar is compiled
        self._inflight = inflight
        self._publish(started, rows, decisions)

    def _grammar_mask(self, requests: list[Request], rows, outputs: list[RequestOutput],
                      decisions: list[Decision]):
        """The step's grammar mask; a request whose grammar failed (no token allowed, say) finishes
        now with reason "error", alone: its row's token is then never used."""
        mask = self.grammars.mask(requests, rows)
        if mask is not None:
            for row, why in mask.failures.items():
                req = requests[row]
                so_far = self.tokenizer.decode(req.known_output_ids, skip_special_tokens=True)
                self._finish_with_error(req, f"{req.request_id}: {why} (output so far: {so_far[-80:]!r})",
                                        outputs, decisions)
        return mask

    def _finish_with_error(self, req: Request, message: str, outputs: list[RequestOutput],
                           decisions: list[Decision]) -> None:
        decisions.append(self.scheduler.finish(req, "error"))
        out = self._retire(RequestOutput(req.request_id, [], "", True, "error"))
        out.completion.error = message
        outputs.append(out)

    def _take_inflight(self, decisions: list[Decision]) -> list[RequestOutput]:
        """Read back the previous step's tokens (waiting for the GPU if need be) and handle them."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return []
        tokens = inflight.tokens()
        now = time.perf_counter()
        outputs = []
        for req, index, token in zip(inflight.requests, inflight.indices, tokens):
            if req.finished:  # aborted, or stopped a step ago on a token seen late
                continue
            req.fill_pending_token(index, token)
            outputs.append(self._accept_token(req, index, now, None, 0, decisions))
        return outputs

    def _fail_batch(self, err: Exception, outputs: list[RequestOutput]) -> None:
        """Finish the failed step's requests (all running ones if scheduling itself failed) and
        those whose tokens were in flight, with reason "error"; their KV goes back to the pool."""
        victims = list(self.scheduler.running) if self._batch is None else [req for req, _ in self._batch]
        if self._inflight is not None:
            victims += self._inflight.requests
            self._inflight = None
        self._batch = None
        message = f"the engine step running this request failed: {type(err).__name__}: {err}"
        decisions = []
        for req in {id(r): r for r in victims}.values():  # once each, in order
            if req.finished or req.request_id not in self._requests:
                continue
            self._finish_with_error(req, message, outputs, decisions)
        self._publish(time.perf_counter(), [], self._carried_decisions + decisions)
        self._carried_decisions = []

    def stats(self) -> dict:
        if self._closed:
            return {"model": self.model_name, "closed": True}
        if self._on_foreign_thread():  # forwarded to the loop's thread
            return self._loop.stats()
        pool = self.pool
        return {
            "model": self.model_name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "kernels": self.model.kernels.name, "scheduler": self.scheduler.policy.name,
            "kv_capacity_tokens": pool.capacity, "kv_free_tokens": pool.free_tokens,
            "kv_used_tokens": pool.capacity - pool.free_tokens, "page_size": pool.page_size,
            "kv_cached_tokens": self.scheduler.reclaimable_tokens,  # unused prefix cache, inside kv_used
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "steps": self._step, "weight_bytes": self.model.weight_bytes(), "closed": False,
            "max_running": self.scheduler.max_running, "max_batch_tokens": self.scheduler.max_batch_tokens,
            **self.cache_scopes.describe(),
        }

    def clear_prefix_cache(self) -> int:
        """Drop every cached prefix no running request uses; returns the number of tokens freed."""
        self._check_open()
        if self._on_foreign_thread():  # forwarded to the loop's thread
            return self._loop.clear_prefix_cache()
        decision = self.scheduler.clear_prefix_cache()
        if decision is None:
            return 0
        self._carried_decisions.append(decision)
        return decision.numbers["evicted"]

    def close(self) -> None:
        """Stop the driver loop (its requests finish with "abort"), release the model, the KV cache
        and every request; the engine cannot be used afterwards."""
        with self._loop_lock:
            if self._closed:
                return
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.shutdown()
        self._closed = True
        self._requests.clear()
        self._detokenizers.clear()
        self._events.close()
        self.grammars.close()
        if hasattr(self.model, "close"):  # a tensor-parallel model's worker processes
            self.model.close()
        del self.model, self.pool, self.runner, self.scheduler
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Engine is closed: create a new one")


def _close_unclosed(engine_ref: weakref.ref, events: EventHub) -> None:
    engine = engine_ref()
    if engine is None:
        events.close()
    else:
        engine.close()
