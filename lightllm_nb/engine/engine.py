"""The engine: requests in, tokens out, one scheduler step at a time.

`generate`, `stream` and `chat` are built on the low-level `add_request` / `step` / `abort`.
The engine is not thread-safe: a server runs it from one loop thread.
"""

from __future__ import annotations

import itertools
import numbers
import time
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..scheduling.admission import AdmissionPolicy
from ..scheduling.decisions import Decision
from .detokenizer import IncrementalDetokenizer
from .grammar import GrammarCompiler, RequestGrammar, TokenMask
from .engine_setup import choose_batch_limits, resolve_device, resolve_dtype, size_kv_tokens
from .inflight import InflightTokens
from ..models.kernel_set import kernels_for
from ..kv.cache_scope import CacheScopes, check_scope_settings, tokenize_shared_prefixes
from ..kv.kv_pool import KVPool
from ..loading import Checkpoint, load_checkpoint
from .model_runner import ModelRunner
from ..scheduling.policies import make_policy
from ..models.config import ModelConfig
from ..models.weights import build_model
from .prompt_checks import check_fits, prompt_ids
from ..scheduling.request import PENDING_TOKEN, Completion, Request, RequestOutput, request_metrics
from .sampler import RequestSampler, Sampler
from ..sampling_params import InvalidRequestError, SamplingParams
from ..scheduling.scheduler import Scheduler
from ..telemetry.events import BatchRow, EventHub, StepEvent



class Engine:
    def __init__(self, model: str | Checkpoint = "demo", *, device: str = "auto", dtype: str | torch.dtype = "auto",
                 kv_tokens: int | None = None, page_size: int = 1, max_batch_tokens: int | None = None,
                 max_running: int | None = None, scheduler: str | AdmissionPolicy = "past_future", prefix_cache: bool = True,
                 max_running_per_user: int | None = None, seed: int | None = None,
                 kv_memory_fraction: float = 0.85, cuda_graphs: bool = True, overlap: bool | None = None,
                 progress: bool = True, prefix_cache_scope: str = "user", shared_prefixes: Sequence | None = None):
        make_policy(scheduler)  # a bad name fails before the (slow) model load
        check_scope_settings(prefix_cache_scope, shared_prefixes, prefix_cache)  # see kv/cache_scope.py
        self.device = resolve_device(device)
        checkpoint = model if isinstance(model, Checkpoint) else load_checkpoint(model)
        self.config = ModelConfig.from_hf(checkpoint.config)
        self.dtype = resolve_dtype(dtype, self.device, checkpoint.config)
        self.tokenizer = checkpoint.tokenizer
        self.model_name = checkpoint.source
        self.model = build_model(self.config, checkpoint, device=self.device, dtype=self.dtype,
                                 kernels=kernels_for(self.device), max_positions=self.config.max_position_embeddings,
                                 progress=progress)
        kv_tokens = kv_tokens or size_kv_tokens(self.config, self.dtype, self.device, kv_memory_fraction)
        capacity = kv_tokens // page_size * page_size if page_size >= 1 else kv_tokens  # whole pages only
        # None: chosen from the device, the model and the pool (the rule is in engine_setup).
        max_running, max_batch_tokens = choose_batch_limits(self.config, self.dtype, self.device, kv_tokens,
                                                            max_running, max_batch_tokens)
        self.pool = KVPool(num_layers=self.config.num_layers, num_kv_heads=self.config.num_kv_heads,
                           head_dim=self.config.head_dim, num_tokens=kv_tokens, page_size=page_size,
                           max_requests=max_running,
                           max_context=min(self.config.max_position_embeddings, capacity),
                           dtype=self.dtype, device=self.device)
        self.cache_scopes = CacheScopes(prefix_cache_scope, tokenize_shared_prefixes(shared_prefixes, self.tokenizer))
        self.scheduler = Scheduler(self.pool, make_policy(scheduler), max_batch_tokens=max_batch_tokens,
                                   max_running=max_running, prefix_cache=prefix_cache,
                                   max_running_per_user=max_running_per_user, cache_scopes=self.cache_scopes)
        self.runner = ModelRunner(self.model, self.pool, cuda_graphs=cuda_graphs, max_batch=max_running,
                                  progress=progress)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        self.sampler = Sampler(self.config.vocab_size, self.device, generator=generator)
        self.eos_token_ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.grammars = GrammarCompiler(self.tokenizer, self.config.vocab_size, self.eos_token_ids)
        self._requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._pending: list[RequestOutput] = []   # outputs step() has yet to hand out (aborts, others' steps)
        self._outboxes: dict[str, list[RequestOutput]] = {}  # outputs of requests generate()/stream() await
        self._carried_decisions: list[Decision] = []  # decisions made between steps (aborts)
        self._inflight: InflightTokens | None = None  # the previous overlapped step's tokens
        # Overlap only pays where the GPU runs ahead of the host; on the CPU there is nothing to hide.
        self.overlap = overlap if overlap is not None else self.device.type == "cuda"
        self._ids = itertools.count()
        self._events = EventHub()
        self._step = 0
        self._start = time.perf_counter()
        self._closed = False

    # ---- low-level API ---------------------------------------------------------------------
    def add_request(self, prompt: str | None = None, sampling: SamplingParams | None = None, *,
                    prompt_token_ids: Sequence[int] | None = None, user: str = "default", priority: int = 0,
                    request_id: str | None = None, stream_text: bool = False) -> str:
        """Queue a request; returns its id. Its outputs come back from `step()`.
        Raises InvalidRequestError for bad input (nothing is queued)."""
        self._check_open()
        sampling = sampling or SamplingParams()
        ids = prompt_ids(self.tokenizer, self.config.vocab_size, prompt, prompt_token_ids)
        check_fits(ids, sampling, self.pool.max_context)
        return self._queue(ids, sampling, user, priority, request_id, stream_text)

    def _queue(self, ids: list[int], sampling: SamplingParams, user: str, priority: int,
               request_id: str | None, stream_text: bool) -> str:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequestError(f"priority={priority!r} is invalid: it must be an integer (higher runs first)")
        if not isinstance(user, str) or not user:
            raise InvalidRequestError(f"user={user!r} is invalid: it must be a non-empty string")
        if request_id is None:
            request_id = next(rid for rid in (f"req-{n}" for n in self._ids) if rid not in self._requests)
        elif request_id in self._requests:
            raise InvalidRequestError(f"request_id={request_id!r} is already in use: pick another or omit it")
        req = Request(request_id, ids, sampling, user=user, priority=priority)
        req.sampler = RequestSampler(sampling, ids, self.device)
        if sampling.constraint is not None:  # compiles off this thread; the request waits until then
            req.grammar = RequestGrammar(self.grammars.compile(sampling.constraint))
        if stream_text or sampling.stop:
            self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, ids, sampling.stop)
        self._requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV slots; False if it is unknown or already done."""
        req = self._requests.get(request_id)
        if req is None or req.finished:
            return False
        self._carried_decisions.append(self.scheduler.finish(req, "abort"))
        self._deliver([self._retire(RequestOutput(request_id, [], "", True, "abort"))], self._pending)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending) or self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """Run one batch: schedule, forward, sample, retire finished requests.

        Overlapped (CUDA, when no request in the batch needs its tokens on the host to sample):
        the step is launched, then the previous step's tokens are read back and handled while
        the GPU computes, so the host's bookkeeping hides behind the GPU's work. A request that
        stopped on a token seen this late has run one wasted step; its extra token is dropped.
        """
        self._check_open()
        outputs, self._pending = self._pending, []
        self._deliver(self._run_step(), outputs)
        return outputs

    def _deliver(self, outputs: list[RequestOutput], others: list[RequestOutput]) -> None:
        """Outputs of requests that generate()/stream() wait for go to their outboxes, so that
        whoever's loop happens to run the step, nobody else's results are lost; the rest to `others`."""
        for out in outputs:
            box = self._outboxes.get(out.request_id)
            (box if box is not None else others).append(out)

    def _advance(self) -> None:
        """One step on behalf of generate()/stream(): outputs of plain add_request() requests wait
        in `_pending` for the next step() call."""
        if not (self.scheduler.has_work() or self._inflight is not None):
            raise RuntimeError("the engine has no work left but a request is still awaited: this is a bug")
        self._deliver(self._run_step(), self._pending)

    def _run_step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        outputs = []
        batch = self.scheduler.schedule()
        decisions = self._carried_decisions + batch.decisions
        self._carried_decisions = []
        # Rows are described only for listeners: at batch 256 this is measurable host time.
        rows = [BatchRow(r.request_id, r.user, "decode" if r.is_decoding else "prefill", n, r.num_computed + n)
                for r, n in batch.items] if self._events else []
        inflight = None
        if batch:
            logits, sampling_reqs, sample_rows = self.runner.run(batch.items)
            for req, n in batch.items:
                req.num_computed += n
            samplers = [r.sampler for r in sampling_reqs]
            if self.overlap and self.sampler.can_defer(samplers):
                tokens = self.sampler.sample_on_device(logits, samplers)
                self.runner.remember_tokens(sample_rows, tokens)
                inflight = InflightTokens(sampling_reqs, tokens)
                outputs += self._take_inflight(decisions)
            else:
                outputs += self._take_inflight(decisions)  # penalties must observe the previous token
                mask = TokenMask.for_batch([r.grammar for r in sampling_reqs], self.config.vocab_size)
                if mask is not None and rows:  # show the grammar narrowing each constrained row's choice
                    allowed = {sampling_reqs[i].request_id: n for i, n in mask.allowed_counts().items()}
                    for row in rows:
                        row.allowed_tokens = allowed.get(row.request_id)
                sampled = self.sampler.sample(logits, samplers, mask)
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
        return outputs

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
            req.token_ids[index] = token
            outputs.append(self._accept_token(req, index, now, None, 0, decisions))
        return outputs

    # ---- high-level API --------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None, user: str = "default",
                 progress: bool | None = None) -> list[Completion]:
        """Run many prompts together through continuous batching; results in input order."""
        self._check_open()
        if (prompts is None) == (prompt_token_ids is None):
            raise InvalidRequestError("pass exactly one of prompts (text) or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompt_token_ids is not None and any(isinstance(p, numbers.Integral) for p in prompt_token_ids):
            raise InvalidRequestError("prompt_token_ids takes a list of prompts, each a list of token ids: "
                                      "wrap a single prompt as [ids]")
        inputs = list(prompts) if prompts is not None else [list(p) for p in prompt_token_ids]
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(inputs)
        if len(params) != len(inputs):
            raise InvalidRequestError(f"got {len(params)} SamplingParams for {len(inputs)} prompts: "
                                      "pass one, or one per prompt")
        # Validate everything before queueing anything, so a bad prompt leaves no half-run batch.
        encoded = [prompt_ids(self.tokenizer, self.config.vocab_size, p, None) if prompts is not None
                   else prompt_ids(self.tokenizer, self.config.vocab_size, None, p) for p in inputs]
        for ids, p in zip(encoded, params):
            check_fits(ids, p or SamplingParams(), self.pool.max_context)
        show = progress if progress is not None else len(inputs) >= 8
        done: dict[str, Completion] = {}
        rids: list[str] = []
        with tqdm(total=len(inputs), disable=not show, desc="generating", unit="req") as bar:
            try:
                for ids, p in zip(encoded, params):
                    rids.append(self._queue(ids, p or SamplingParams(), user, 0, None, False))
                    self._outboxes[rids[-1]] = []
                while True:
                    for rid in rids:
                        for out in self._outboxes[rid]:
                            if out.completion is not None:
                                done[rid] = out.completion
                                bar.update(1)
                        self._outboxes[rid].clear()
                    if len(done) == len(rids):
                        break
                    self._advance()
            finally:  # an interrupted generate must not leave its requests holding KV slots
                for rid in rids:
                    if rid not in done:
                        self.abort(rid)
                    self._outboxes.pop(rid, None)
        return [done[rid] for rid in rids]

    def stream(self, prompt: str | None = None, sampling: SamplingParams | None = None, *,
               prompt_token_ids: Sequence[int] | None = None, user: str = "default") -> Iterator[str]:
        """Yield text deltas as tokens are produced. Closing the iterator early aborts the request."""
        self._check_open()
        rid = self.add_request(prompt, sampling, prompt_token_ids=prompt_token_ids, user=user, stream_text=True)
        self._outboxes[rid] = []
        done = False
        try:
            while not done:
                box, self._outboxes[rid] = self._outboxes[rid], []
                for out in box:
                    if out.text_delta:
                        yield out.text_delta
                    done = done or out.finished
                if not done and not self._outboxes[rid]:
                    self._advance()
        finally:
            if not done:
                self.abort(rid)
            self._outboxes.pop(rid, None)

    def chat(self, messages: list[dict], sampling: SamplingParams | None = None, *,
             user: str = "default") -> Completion:
        """One assistant reply to `messages`, formatted with the tokenizer's chat template."""
        return self.generate(prompt_token_ids=[self.chat_prompt_ids(messages)], sampling=sampling,
                             user=user, progress=False)[0]

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(f"the model {self.model_name} has no chat template: use generate() "
                                      "with a plain prompt instead")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def subscribe(self, callback: Callable[[StepEvent], None], *, pages: bool = False) -> Callable[[], None]:
        """Call `callback` with every StepEvent; returns a function that unsubscribes.

        `pages=True` adds the owner of every KV page to the event (a list as long as the pool has
        pages: ask for it only where occupancy is drawn)."""
        return self._events.subscribe(callback, pages)

    def stats(self) -> dict:
        pool = self.pool
        return {
            "model": self.model_name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "kernels": self.model.kernels.name, "scheduler": self.scheduler.policy.name,
            "kv_capacity_tokens": pool.capacity, "kv_free_tokens": pool.free_tokens,
            "kv_used_tokens": pool.capacity - pool.free_tokens, "page_size": pool.page_size,
            "kv_cached_tokens": self.scheduler.reclaimable_tokens,  # unused prefix cache, inside kv_used
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "steps": self._step, "weight_bytes": self.model.weight_bytes(),
            **self.cache_scopes.describe(),
            "max_running": self.scheduler.max_running, "max_batch_tokens": self.scheduler.max_batch_tokens,
        }

    def clear_prefix_cache(self) -> int:
        """Drop every cached prefix no running request uses; returns the number of tokens freed."""
        self._check_open()
        decision = self.scheduler.clear_prefix_cache()
        if decision is None:
            return 0
        self._carried_decisions.append(decision)
        return decision.numbers["evicted"]

    def close(self) -> None:
        """Release the model, the KV cache and every request; the engine cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        self._requests.clear()
        self._detokenizers.clear()
        self._events.clear()
        self.grammars.close()
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

    def _accept_token(self, req: Request, index: int, now: float, sampled, i: int,
                      decisions: list[Decision]) -> RequestOutput:
        """Handle the token at token_ids[index]: stop checks, text, and retirement if finished."""
        token = req.token_ids[index]
        req.sampler.observe(token)
        if req.grammar is not None and not req.grammar.accept(token):
            raise RuntimeError(f"{req.request_id}: token {token} passed the grammar's mask but the grammar "
                               "refused it: this is a bug")
        if sampled is not None and sampled.logprobs[i] is not None:
            req.logprobs.append({"token_id": token, "logprob": sampled.logprobs[i],
                                 "top": sampled.top_logprobs[i]})
        if req.first_token_time is None:
            req.first_token_time = now
        p = req.sampling
        reason = None
        if (token in p.stop_token_ids) or (not p.ignore_eos and token in self.eos_token_ids) or (
                req.grammar is not None and req.grammar.terminated):
            reason = "stop"
        detok = self._detokenizers.get(req.request_id)
        if detok is not None and reason is None and detok.add(token):
            reason = "stop"
        if reason is None and index + 1 - req.num_prompt >= p.max_tokens:
            reason = "length"
        delta = detok.take_delta(final=reason is not None) if detok is not None else ""
        out = RequestOutput(req.request_id, [token], delta, reason is not None, reason)
        if reason is None:
            return out
        del req.token_ids[index + 1:]  # a token the next overlapped step already asked for
        decisions.append(self.scheduler.finish(req, reason))
        return self._retire(out)

    def _retire(self, out: RequestOutput) -> RequestOutput:
        """Forget a finished request, attaching its Completion to its last output."""
        req = self._requests.pop(out.request_id)
        detok = self._detokenizers.pop(out.request_id, None)
        ids = [t for t in req.output_ids if t != PENDING_TOKEN]
        if detok is not None:
            text = detok.text
        else:
            # A stop token ends the output but is not part of its text.
            shown = ids[:-1] if ids and req.finish_reason == "stop" else ids
            text = self.tokenizer.decode(shown, skip_special_tokens=True)
        out.completion = Completion(req.request_id, text, ids, req.finish_reason, req.num_prompt,
                                    request_metrics(req), req.logprobs or None)
        return out

    def _publish(self, started: float, rows: list[BatchRow], decisions: list[Decision]) -> None:
        self._step += 1
        if not self._events:
            return
        pool = self.pool
        self._events.publish(
            StepEvent(step=self._step, time=started - self._start, duration=time.perf_counter() - started,
                      rows=rows, decisions=decisions, kv_capacity=pool.capacity,
                      kv_free=self.scheduler.pool_view().free, kv_cached=self.scheduler.reclaimable_tokens,
                      running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                      page_size=pool.page_size),
            page_owner=lambda: pool.page_owner.tolist())
