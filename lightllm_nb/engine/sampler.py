"""Turn one step's logits into one token per request.

Per row, in vLLM's order:
  1. penalties on the raw logits: repetition (tokens of the prompt and of the output), then
     presence and frequency (tokens of the output only, as OpenAI defines them);
  2. logprobs, when asked, are log_softmax of these penalized logits, before temperature, top-k and
     top-p (vLLM's "raw" logprobs): they describe the model's distribution rather than the sampling
     knobs, so greedy and sampled requests report comparable numbers and truncated tokens keep a
     finite log-prob;
  3. temperature 0 takes the argmax; otherwise divide by the temperature, keep the top-k, then the
     top-p nucleus of what top-k left, and draw.

Draws on the GPU use the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with
probability p_i, so one batched argmax serves every sampled row. Rows that keep the whole vocabulary
(no top-k, no top-p) race in one fused kernel (kernels/race_sample.py: temperature, the grammar's
mask and the draw in one read of the logits) whose counter-based noise is keyed by the request's
seed and its draw number, so a seeded request's tokens do not depend on its batch or its row;
unseeded rows get random keys from a generator the engine seeds. Rows that truncate take the torch
path (sort, cumulative sums) and, when seeded, their own torch generator's noise. On
the CPU, drawing a number per vocabulary entry is most of the cost (torch's exponential_ took 18 ms
for 16 rows of the demo's 49k tokens on 2 cores, a quarter of a 16-stream step), so a row draws
one uniform number u instead and takes the first token whose cumulative probability passes u times
the row's total (inverse CDF: 0.4 ms for the same rows); the same per-row generators keep seeded
draws independent of the batch.

GPU cost: the common case (all greedy, no penalties, no logprobs) is one argmax; sampled rows without
truncation one kernel launch; otherwise a step costs a few batched ops, pinned non-blocking uploads
of the batch's settings (only when its requests change), and one device-to-host transfer for
everything the caller gets back. Python loops over rows only build host lists, except
one noise draw per seeded row, which a per-request generator makes unavoidable.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightllm_nb.sampling_params import SamplingParams

from ..kernels import race_sample
from .batch_settings import BatchSettings, to_device
from .grammar import TokenMask


class _PenaltyHistory:
    """The token ids a penalized request's penalties look at, kept on the device as ids.

    Ids rather than a dense count vector per request: a request doesn't know the (padded) vocabulary
    size, its memory grows with its output instead of with the vocabulary (150k counts per request
    add up over a batch of hundreds), and the sampler rebuilds dense counts only for the penalized
    rows of a step, with one scatter.
    """

    def __init__(self, prompt_ids: Sequence[int], keep_prompt: bool, device: torch.device):
        # Only the repetition penalty looks at the prompt, and only at which ids occur in it.
        self.prompt_ids = to_device(sorted(set(prompt_ids)) if keep_prompt else [], torch.int64, device)
        self._generated = torch.empty(16, dtype=torch.int64, device=device)
        self.num_generated = 0

    def append(self, token_id: int) -> None:
        if self.num_generated == len(self._generated):
            self._generated = torch.cat([self._generated, torch.empty_like(self._generated)])
        # fill_ passes the id as a kernel argument: no host-to-device copy, no synchronization.
        self._generated[self.num_generated].fill_(token_id)
        self.num_generated += 1

    @property
    def generated_ids(self) -> torch.Tensor:
        return self._generated[: self.num_generated]


class RequestSampler:
    """One request's sampling state, created when the request is admitted."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], device: torch.device):
        device = torch.device(device)
        self.params = params
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            # Seeded once and consumed only by this request's draws, so its tokens don't depend on
            # the other requests in its batches or on its row index.
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.history: _PenaltyHistory | None = None
        if params.uses_penalties:
            self.history = _PenaltyHistory(prompt_ids, params.repetition_penalty != 1.0, device)
        # A seeded request's fused-kernel draws so far: with the seed, they pick its next noise (unseeded
        # requests get a fresh random key instead, so theirs is not counted).
        self.draws = 0
        # Draws from part of the vocabulary (top-k or top-p): the torch path, not the fused race.
        # Kept, not a property: every sampled step asks it of every row.
        self.truncates = not params.greedy and bool(params.top_k or params.top_p < 1.0)

    def observe(self, token_id: int) -> None:
        """Record a generated token; only penalties need the output, so others keep nothing."""
        if self.history is not None:
            self.history.append(token_id)


@dataclass
class SampledTokens:
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]

    @classmethod
    def without_logprobs(cls, token_ids: list[int]) -> SampledTokens:
        return cls(token_ids, [None] * len(token_ids), [None] * len(token_ids))


class Sampler:
    """Chooses one token per row of a step's logits, one row per request."""

    def __init__(self, vocab_size: int, device: torch.device, generator: torch.Generator | None = None):
        self.vocab_size = vocab_size  # the tokenizer's; logits may be wider (padded), never narrower
        self.device = torch.device(device)
        # Draws for requests without a seed of their own; the engine owns it so that
        # Engine(seed=...) reproduces a whole run without touching torch's global RNG.
        self.generator = generator
        # Keys of unseeded rows' race noise: drawn on the host (no wait for the device), from the
        # engine generator's seed, so that Engine(seed=...) reproduces them too.
        self._keys = random.Random(generator.initial_seed() if generator is not None else None)
        self._batch: BatchSettings | None = None  # the latest batch's, kept while its rows stay
        self._split_counters: torch.Tensor | None = None  # the race kernel's, which it leaves at zero

    def sample(self, logits: torch.Tensor, requests: Sequence[RequestSampler],
               mask: TokenMask | None = None) -> SampledTokens:
        self._check_batch(logits, requests)
        if mask is not None:  # structured output: disallowed tokens leave the race before it starts
            logits = mask.apply(logits)  # logprobs then describe the tokens the grammar allowed
        params = [request.params for request in requests]
        if all(p.greedy and not p.uses_penalties and p.logprobs is None for p in params):
            return SampledTokens.without_logprobs(logits.argmax(dim=-1).tolist())
        logits = logits.float()
        penalized = [row for row, p in enumerate(params) if p.uses_penalties]
        if penalized:
            logits = self._apply_penalties(logits, penalized, [requests[row] for row in penalized])
        token_ids = self._choose_tokens(logits, requests)
        return self._collect(logits, token_ids, params)

    @staticmethod
    def can_defer(requests: Sequence[RequestSampler]) -> bool:
        """True when choosing these rows' tokens needs nothing from the host: no penalties (they
        need the previous token observed) and no logprobs (they come back as numbers)."""
        return all(not r.params.uses_penalties and r.params.logprobs is None for r in requests)

    def sample_on_device(self, logits: torch.Tensor, requests: Sequence[RequestSampler],
                         mask: TokenMask | None = None) -> torch.Tensor:
        """Token ids [B] left on the device, without waiting for the GPU; only for `can_defer` rows."""
        self._check_batch(logits, requests)
        batch = self._settings(requests, logits.shape[-1])
        if self.device.type == "cuda" and not (batch.greedy and mask is None) and not batch.truncates:
            return self._race(logits, requests, mask)  # the mask goes into the race's one pass
        if mask is not None:
            logits = mask.apply(logits)
        if batch.greedy:
            return logits.argmax(dim=-1)
        return self._choose_tokens(logits.float(), requests)

    def _check_batch(self, logits: torch.Tensor, requests: Sequence[RequestSampler]) -> None:
        if logits.dim() != 2 or logits.shape[0] != len(requests) or logits.shape[1] < self.vocab_size:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} don't fit this batch: expected "
                f"[{len(requests)}, >= {self.vocab_size}], one row per request covering at least the "
                f"tokenizer's {self.vocab_size} tokens")

    def _apply_penalties(self, logits: torch.Tensor, rows: list[int],
                         requests: list[RequestSampler]) -> torch.Tensor:
        """Penalize the given rows; returns a new tensor so the caller's logits stay untouched."""
        histories = [request.history for request in requests]
        row_index, generated_lengths, prompt_lengths = to_device(
            [rows, [h.num_generated for h in histories], [len(h.prompt_ids) for h in histories]],
            torch.int64, self.device)
        strengths = to_device(
            [[r.params.repetition_penalty, r.params.presence_penalty, r.params.frequency_penalty]
             for r in requests], torch.float32, self.device)
        repetition, presence, frequency = strengths[:, 0:1], strengths[:, 1:2], strengths[:, 2:3]

        penalized = logits.index_select(0, row_index)
        counts = torch.zeros_like(penalized)
        counts.index_put_(_ids_by_row([h.generated_ids for h in histories], generated_lengths),
                          counts.new_ones(()), accumulate=True)
        generated = counts > 0
        seen = generated.index_put(_ids_by_row([h.prompt_ids for h in histories], prompt_lengths),
                                   generated.new_ones(()))
        penalized = torch.where(
            seen, torch.where(penalized > 0, penalized / repetition, penalized * repetition), penalized)
        penalized = penalized - presence * generated - frequency * counts
        return logits.index_put((row_index,), penalized)

    def _choose_tokens(self, logits: torch.Tensor, requests: Sequence[RequestSampler]) -> torch.Tensor:
        if all(r.params.greedy for r in requests):
            return logits.argmax(dim=-1)
        if self.device.type != "cuda":
            return self._truncated_draw(logits, requests)
        if all(r.truncates or r.params.greedy for r in requests):
            return self._truncated_draw(logits, requests)  # no row would keep the race's token
        tokens = self._race(logits, requests)
        if self._batch.truncates:
            # The torch path runs on every row; only the truncating rows' draws are kept.
            tokens = torch.where(self._batch.truncating, self._truncated_draw(logits, requests), tokens)
        return tokens

    def _race(self, logits: torch.Tensor, requests: Sequence[RequestSampler],
              mask: TokenMask | None = None) -> torch.Tensor:
        """Every row's token by the fused race (greedy rows: the argmax; the mask, if any, applied)."""
        batch = self._settings(requests, logits.shape[-1])
        bitmask, flags = mask.on_device(logits.device) if mask is not None else (None, None)
        if self._split_counters is None or len(self._split_counters) < len(requests):
            self._split_counters = torch.zeros(max(len(requests), 256), dtype=torch.int32, device=self.device)
        tokens = race_sample(logits, *batch.race, bitmask, flags, mask.grammar_vocab if mask is not None else 0,
                             self._split_counters)
        for request in batch.seeded:  # the kernel counted every row's draw on the device
            request.draws += 1
        return tokens

    def _truncated_draw(self, logits: torch.Tensor, requests: Sequence[RequestSampler]) -> torch.Tensor:
        """Each row's draw after temperature, top-k and top-p (greedy rows: the argmax); float logits."""
        batch = self._settings(requests, logits.shape[-1])
        table = batch.table
        scaled = logits / table[:, 0:1]
        probs = scaled.softmax(dim=-1)
        if batch.truncates:
            # Masking probabilities computed over the whole row, rather than renormalizing, keeps a
            # row's numbers the same whether or not other rows in the batch truncate; the race
            # below doesn't need them to sum to one.
            keep = _top_k_top_p_mask(scaled, table[:, 1:2].long(), table[:, 2:3])
            probs = probs.masked_fill(~keep, 0.0)
        drawn = self._draw(probs, requests)
        if not any(r.params.greedy for r in requests):
            return drawn
        return torch.where(table[:, 3].bool(), logits.argmax(dim=-1), drawn)

    def _settings(self, requests: Sequence[RequestSampler], vocab: int) -> BatchSettings:
        """The batch's settings on the device, kept while the same requests fill the same rows
        (decode steps of one batch, one after another): an upload costs the host ~70 us a step (a
        pinned copy), the check a few; the race's draw numbers then advance on the device alone."""
        batch = self._batch
        if (batch is None or batch.vocab != vocab or len(batch.requests) != len(requests)
                or not all(a is b for a, b in zip(batch.requests, requests))):
            batch = self._batch = BatchSettings(list(requests), vocab, self.device, self._keys)
        return batch

    def _draw(self, probs: torch.Tensor, requests: Sequence[RequestSampler]) -> torch.Tensor:
        """One token per row with probability proportional to probs (unnormalized; 0 where truncated)."""
        if probs.device.type != "cpu":
            return (probs / self._exponential_noise(probs, requests)).argmax(dim=-1)
        uniform = torch.rand((len(requests), 1), generator=self.generator)
        for row, request in enumerate(requests):
            if request.generator is not None and not request.params.greedy:
                uniform[row] = torch.rand(1, generator=request.generator)
        return inverse_cdf(probs, uniform)

    def _exponential_noise(self, probs: torch.Tensor, requests: Sequence[RequestSampler]) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, request in enumerate(requests):
            if request.generator is not None and not request.params.greedy:
                noise[row].exponential_(generator=request.generator)
        # The CPU generator can return exactly 0, and 0/0 would be a NaN that argmax picks.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _collect(self, logits: torch.Tensor, token_ids: torch.Tensor,
                 params: list[SamplingParams]) -> SampledTokens:
        asking = [row for row, p in enumerate(params) if p.logprobs is not None]
        if not asking:
            return SampledTokens.without_logprobs(token_ids.tolist())
        rows = to_device(asking, torch.int64, self.device)
        logprobs = logits.index_select(0, rows).log_softmax(dim=-1)
        chosen = logprobs.gather(1, token_ids.index_select(0, rows)[:, None]).squeeze(1)
        top_n = max(params[row].logprobs for row in asking)
        top_values, top_ids = logprobs.topk(top_n, dim=-1)
        # One transfer for everything: float64 holds token ids (< 2**53) and float32 values exactly.
        packed = torch.cat([token_ids.double(), chosen.double(), top_values.double().flatten(),
                            top_ids.double().flatten()]).tolist()
        batch, asked = len(params), len(asking)
        chosen_values = packed[batch: batch + asked]
        top_values_flat = packed[batch + asked: batch + asked + asked * top_n]
        top_ids_flat = packed[batch + asked + asked * top_n:]
        result = SampledTokens.without_logprobs([int(t) for t in packed[:batch]])
        for j, row in enumerate(asking):
            start = j * top_n
            result.logprobs[row] = chosen_values[j]
            # A token the grammar forbids (logprob -inf) is no alternative: a row may list fewer.
            result.top_logprobs[row] = [(int(top_ids_flat[start + m]), top_values_flat[start + m])
                                        for m in range(params[row].logprobs)
                                        if top_values_flat[start + m] != -math.inf]
        return result


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row of probs [B, V] (unnormalized, 0 where truncated), the first token whose cumulative
    sum passes uniform [B, 1] (in [0, 1)) times the row's total: token i with probability
    probs[i] / total. (torch's CPU cumsum accumulates float32 in double: each partial sum is one
    float32 rounding away from the exact one, ~6e-8 of the row's total, even over 152k terms.)"""
    cdf = probs.cumsum(dim=-1)
    # right=True: a token of no probability (the same sum as the one before it) is never chosen.
    drawn = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(1)
    # u * total can round up to the total itself, past every sum: the row's last possible token.
    past_end = drawn >= probs.shape[1]
    if past_end.any():
        last = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
        drawn = torch.where(past_end, last, drawn)
    return drawn


def _ids_by_row(ids_per_row: list[torch.Tensor],
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, id) index pairs for all rows' ids at once, for a single index_put_ into [rows, vocab]."""
    ids = torch.cat(ids_per_row)
    # output_size is known on the host; without it repeat_interleave would wait for the device.
    row = torch.arange(len(ids_per_row), device=ids.device).repeat_interleave(lengths, output_size=len(ids))
    return row, ids


def _top_k_top_p_mask(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which tokens survive top-k, then top-p on the distribution top-k leaves; top_k, top_p: [rows, 1].

    Tokens tied with the last one kept stay in, for both cuts (as HF's and vLLM's top-k do): which
    of equal tokens a sort puts first is arbitrary, so a cut through a tie would be too, and a
    seeded request would depend on the sort's tie order.
    """
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    keep = sorted_logits >= sorted_logits.gather(1, top_k - 1)
    sorted_probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # top_p = 1 keeps everything even where rounding lets the running sum reach 1 before the tail.
    in_nucleus = (mass_before < top_p) | (top_p >= 1.0)
    nucleus_size = in_nucleus.sum(dim=-1, keepdim=True)
    keep &= sorted_probs >= sorted_probs.gather(1, nucleus_size - 1)
    return torch.empty_like(keep).scatter_(1, order, keep)
