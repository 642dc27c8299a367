"""What a step hands out (mixed into Engine): the previous overlapped step's tokens read back and
handled, each token's output with its stop checks, a finished request's Completion, the requests of
a failed step finished with "error", and the step's event."""

from __future__ import annotations

import time

from ..scheduling.decisions import Decision
from ..scheduling.request import Completion, Request, RequestOutput, request_metrics
from ..telemetry.events import BatchRow, KVHolder, StepEvent


class StepOutputs:
    """Uses Engine's `scheduler`, `pool`, `tokenizer`, `eos_token_ids`, `_requests`, `_detokenizers`,
    `_inflight`, `_deferred`, `_batch`, `_events`, `_step` and `_start`."""

    def _take_inflight(self, decisions: list[Decision], before_handling=None) -> list[RequestOutput]:
        """Read back the previous step's tokens (waiting for the GPU if need be) and handle them.
        Their grammars have noted them when `before_handling` runs."""
        self._sample_deferred()
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            if before_handling is not None:
                before_handling()
            return []
        tokens = inflight.tokens()
        now = time.perf_counter()
        taken = []
        for req, index, token in zip(inflight.requests, inflight.indices, tokens):
            if req.finished:  # aborted, or stopped a step ago on a token seen late
                continue
            req.fill_pending_token(index, token)
            if req.grammar is not None:
                req.grammar.accept(token)  # noted; the next mask consumes it
            taken.append((req, index))
        if before_handling is not None:
            before_handling()
        return [self._accept_token(req, index, now, None, 0, decisions) for req, index in taken]

    def _fail_batch(self, err: Exception, outputs: list[RequestOutput]) -> None:
        """Finish the failed step's requests (all running ones if scheduling itself failed) and
        those whose tokens were in flight, with reason "error"; their KV goes back to the pool."""
        victims = list(self.scheduler.running) if self._batch is None else [req for req, _ in self._batch]
        self._drop_deferred()  # its requests are the batch's
        if self._inflight is not None:
            victims += self._inflight.requests
            self._inflight = None
        self._batch = None
        message = f"the engine step running this request failed: {type(err).__name__}: {err}"
        decisions = []
        for req in {id(r): r for r in victims}.values():  # once each, in order
            if req.finished or req.request_id not in self._requests:
                continue
            decisions.append(self.scheduler.finish(req, "error"))
            out = self._retire(RequestOutput(req.request_id, [], "", True, "error"))
            out.completion.error = message
            outputs.append(out)
        self._publish(time.perf_counter(), [], self._carried_decisions + decisions)
        self._carried_decisions = []


    def _accept_token(self, req: Request, index: int, now: float, sampled, i: int,
                      decisions: list[Decision]) -> RequestOutput:
        """Handle the token at token_ids[index]: stop checks, text, and retirement if finished."""
        token = req.token_ids[index]
        req.sampler.observe(token)
        if sampled is not None and sampled.logprobs[i] is not None:
            req.logprobs.append({"token_id": token, "logprob": sampled.logprobs[i],
                                 "top": sampled.top_logprobs[i]})
        if req.first_token_time is None:
            req.first_token_time = now
            req.queue_time_before_first_token = req.queue_time
            self.scheduler.timelines.first_token(req)
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
        req.drop_tokens_after(index)  # a token the next overlapped step already asked for
        decisions.append(self.scheduler.finish(req, reason))
        return self._retire(out)

    def _retire(self, out: RequestOutput) -> RequestOutput:
        """Forget a finished request, attaching its Completion to its last output."""
        req = self._requests.pop(out.request_id)
        detok = self._detokenizers.pop(out.request_id, None)
        ids = req.known_output_ids
        if detok is not None:
            text = detok.text
        else:
            # A stop token ends the output but is not part of its text.
            shown = ids[:-1] if ids and req.finish_reason == "stop" else ids
            text = self.tokenizer.decode(shown, skip_special_tokens=True)
        out.completion = Completion(req.request_id, text, ids, req.finish_reason, req.num_prompt,
                                    request_metrics(req), req.logprobs or None, timeline=req.timeline)
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
                      page_size=pool.page_size,
                      kv_holders=[KVHolder(r.row, r.request_id, r.user, r.num_computed)
                                  for r in self.scheduler.running if r.row is not None]),
            page_owner=lambda: pool.page_owner)
