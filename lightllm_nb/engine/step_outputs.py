"""What a step hands out: each new token's stop checks and text, a finished request's Completion,
and the step's event for subscribers. Mixed into Engine (engine.py), which owns the state it uses."""

from __future__ import annotations

import time
from typing import Sequence

from ..scheduling.decisions import Decision
from ..scheduling.request import Completion, Request, RequestOutput, request_metrics
from ..telemetry.events import BatchRow, StepEvent
from ..telemetry.step_rows import kv_holders


class StepOutputs:
    """Uses Engine's `scheduler`, `pool`, `tokenizer`, `eos_token_ids`, `_requests`, `_detokenizers`,
    `_events`, `_batch`, `_totals`, `_step` and `_start`."""

    def _accept_token(self, req: Request, index: int, now: float, sampled, i: int,
                      decisions: list[Decision]) -> RequestOutput:
        """Handle the token at token_ids[index]: stop checks, text, and retirement if finished."""
        # Runs once per row and step: attributes are read once, and no property is called.
        token = req.token_ids[index]
        req.sampler.observe(token)
        grammar = req.grammar
        if grammar is not None:
            grammar.accept(token)  # noted; the next mask's threads advance the matcher
        if sampled is not None and sampled.logprobs[i] is not None:
            req.logprobs.append({"token_id": token, "logprob": sampled.logprobs[i],
                                 "top": sampled.top_logprobs[i]})
        first = req.first_token_time is None
        if first:
            req.first_token_time = now
            req.queue_time_before_first_token = req.queue_time
            self.scheduler.timelines.first_token(req)
        self._totals.token_generated(now - req.arrival_time if first else None)  # request_metrics' TTFT
        p = req.sampling
        reason = None
        if (token in p.stop_token_ids) or (not p.ignore_eos and token in self.eos_token_ids) or (
                grammar is not None and grammar.terminated):
            reason = "stop"
        detok = self._detokenizers.get(req.request_id)
        if detok is not None and reason is None and detok.add(token):
            reason = "stop"
        if reason is None and index + 1 - len(req.prompt_ids) >= p.max_tokens:
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
            # A character cut short by the end (max_tokens mid-emoji) decodes as U+FFFD: left out, as
            # a stream leaves it out (IncrementalDetokenizer), so the text is what was streamed.
            text = self.tokenizer.decode(shown, skip_special_tokens=True).rstrip("\ufffd")
        out.completion = Completion(req.request_id, text, ids, req.finish_reason, req.num_prompt,
                                    request_metrics(req), req.logprobs or None, timeline=req.timeline)
        return out

    def _publish(self, started: float, rows: Sequence[BatchRow], decisions: list[Decision]) -> None:
        self._step += 1
        totals = self._totals
        totals.step_computed(self._batch)
        first_token_seconds = totals.take_first_token_seconds()
        if not self._events:
            return
        pool = self.pool
        self._events.publish(
            StepEvent(step=self._step, time=started - self._start, duration=time.perf_counter() - started,
                      rows=rows, decisions=decisions, kv_capacity=pool.capacity,
                      kv_free=self.scheduler.pool_view().free, kv_cached=self.scheduler.reclaimable_tokens,
                      running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                      page_size=pool.page_size,
                      kv_holders=kv_holders(self.scheduler.running),
                      computed_tokens_total=totals.computed_tokens, generated_tokens_total=totals.generated_tokens,
                      first_token_seconds=first_token_seconds),
            page_owner=pool.page_map)
