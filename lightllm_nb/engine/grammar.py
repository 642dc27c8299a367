"""Structured output: grammars compiled off the step thread, one matcher per request, and the
batch's token mask (xgrammar's bitmask) applied to the logits before sampling.

With overlapped steps the mask needs the previous step's tokens accepted by the matchers, so a
batch with a constrained row reads them back right after launching its forward, fills the mask
while the GPU computes, and queues the sampling behind the mask's upload.

A constrained request waits in the scheduler's queue until its grammar is compiled (`ready`), so a
slow compile never holds a batch row. Equal constraints share one compile: the cache is keyed by
the constraint's canonical text and belongs to one engine, hence to one tokenizer.

xgrammar is imported on the first constrained request only: importing it costs seconds.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..sampling_params import xgrammar_grammar, allowed_token_count

MAX_CACHED_GRAMMARS = 256


class GrammarCompiler:
    """Compiles constraints for one tokenizer on a worker thread (results are cached futures), and
    builds each step's mask from its requests' matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], device: torch.device):
        self.vocab_size = vocab_size  # the logits' width: ids past the tokenizer's are never allowed
        self.device = torch.device(device)
        self._filler = None  # xgrammar's batch matcher: fills many rows' masks on its own threads
        self._tokenizer = tokenizer
        self._stop_token_ids = sorted(stop_token_ids)
        self._xgr_compiler = None  # built on the worker: TokenizerInfo reads the whole vocabulary
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._cache: OrderedDict[tuple[str, str], concurrent.futures.Future] = OrderedDict()
        self._lock = threading.Lock()  # add_request may run on a caller's thread

    def compile(self, constraint: tuple[str, str]) -> concurrent.futures.Future:
        """A future of the compiled grammar for (kind, text), started now unless cached."""
        with self._lock:
            future = self._cache.get(constraint)
            if future is None:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")
                future = self._executor.submit(self._compile, *constraint)
                self._cache[constraint] = future
                if len(self._cache) > MAX_CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(constraint)
            return future

    def _compile(self, kind: str, text: str):
        import xgrammar as xgr

        if self._xgr_compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self._stop_token_ids)
            self._xgr_compiler = xgr.GrammarCompiler(info, max_threads=2)
        return self._xgr_compiler.compile_grammar(xgrammar_grammar(kind, text))

    def mask(self, requests: Sequence, rows: Sequence = ()) -> TokenMask | None:
        """The mask of a step's sampling rows (Requests), None when none is constrained: unconstrained
        batches pay nothing. Finished requests (stopped on a token read back late) are not masked:
        their token is dropped anyway. `rows` (the step's BatchRows, for listeners) are told how
        many tokens each constrained row's mask allowed."""
        grammars = [None if r.grammar is None or r.finished else r.grammar for r in requests]
        if all(g is None for g in grammars):
            return None
        if self._filler is None:
            import xgrammar as xgr

            # Its "auto" counts the host's cores; in a container with a CPU quota that oversubscribes.
            self._filler = xgr.BatchGrammarMatcher(max(1, min(8, torch.get_num_threads())))
        mask = TokenMask(grammars, self.vocab_size, self.device, self._filler)
        if rows:
            allowed = mask.allowed_counts()
            by_id = {requests[i].request_id: n for i, n in allowed.items()}
            for row in rows:
                row.allowed_tokens = by_id.get(row.request_id)
        return mask

    def wait_for_pending(self, timeout: float) -> None:
        """Block up to `timeout` seconds until a compile in progress finishes (for an engine with
        nothing to run but requests whose grammars are not ready: better than spinning)."""
        with self._lock:
            pending = [f for f in self._cache.values() if not f.done()]
        if pending:
            concurrent.futures.wait(pending, timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


class RequestGrammar:
    """One request's place in its grammar: the matcher advances with every accepted token."""

    def __init__(self, compiled: concurrent.futures.Future):
        self._compiled = compiled
        self._matcher = None

    @property
    def ready(self) -> bool:
        return self._compiled.done()

    @property
    def matcher(self):
        if self._matcher is None:
            import xgrammar as xgr

            self._matcher = xgr.GrammarMatcher(self._compiled.result())
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar refuses it (the mask should prevent that)."""
        return self.matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        """The grammar accepted a stop token: nothing may follow."""
        return self._matcher is not None and self._matcher.is_terminated()


class TokenMask:
    """The batch's allowed tokens: one bitmask row per sampling row, filled on the host for the
    constrained rows only, applied on the device in one kernel (xgrammar's)."""

    def __init__(self, grammars: Sequence[RequestGrammar | None], vocab_size: int, device: torch.device,
                 filler):
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.rows = [i for i, g in enumerate(grammars) if g is not None]
        # Pinned on CUDA, so the upload is asynchronous; -1 (every bit set) allows every token.
        self.bitmask = torch.full(xgr.get_bitmask_shape(len(grammars), vocab_size), -1, dtype=torch.int32,
                                  pin_memory=device.type == "cuda")
        filler.batch_fill_next_token_bitmask([grammars[i].matcher for i in self.rows], self.bitmask, self.rows)

    def allowed_counts(self) -> dict[int, int]:
        """Row -> tokens its mask allows this step (for StepEvents: the grammar narrowing the choice)."""
        return {i: allowed_token_count(self.bitmask[i], self.vocab_size) for i in self.rows}

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Set disallowed logits to -inf, in place on the constrained rows."""
        import xgrammar as xgr

        if logits.device.type == "cuda":
            # Every row, in one kernel: unconstrained rows' bits are all set, and a list of row
            # indices would travel from pageable memory, which makes the host wait for the forward.
            bitmask = self.bitmask.to(logits.device, non_blocking=True)
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size)
            return logits
        if logits.dtype != torch.float32:
            logits = logits.float()  # xgrammar's CPU kernel takes float32 only
        xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=self.vocab_size, indices=self.rows)
        return logits
