"""Structured output: grammars compiled off the step thread, one matcher per request, and the
batch's token mask (xgrammar's bitmask) applied to the logits before sampling.

A sampled token is only noted when the engine hands it over (`RequestGrammar.accept`); building the
next mask advances every row's matcher past its noted tokens and fills its row, in xgrammar's batch
calls (mask_fill.py). With overlapped steps that happens after this step's forward is launched
and the previous tokens are read back, while the GPU computes; the sampling is queued behind the
mask's upload.

A JSON schema's or a regex's matcher is advanced by each token's text, not its id: xgrammar 0.2.9's
accept_token looks the id up in the tokenizer's special ids one by one (a model's reserved ids are
special too: 36 us a token on the H200 host where there were 79k; the text ~3 us). The text gives
the same state for grammars made of characters only; EBNF can also name tokens, so its matchers go
by id. The grammars cover the tokenizer's ids only (grammar_width); a padded model's extra ids are
forbidden in constrained rows by the mask kernel.

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
from typing import NamedTuple

import numpy as np
import torch

from ..sampling_params import xgrammar_grammar
from .mask_fill import ROWS_PER_THREAD, BitmaskBuffer, MaskFiller

MAX_CACHED_GRAMMARS = 256
# Kinds whose grammars xgrammar builds from characters only: no token-level elements, so accepting
# a token's text gives exactly the state accepting the token does (tests/test_mask_fill.py checks).
TEXT_LEVEL_KINDS = ("json", "regex")


class CompiledConstraint(NamedTuple):
    grammar: object  # xgrammar's CompiledGrammar
    text_level: bool  # its matchers may accept a token's text in place of the token


def token_texts(info) -> list:
    """Token id -> its bytes (xgrammar's decoded vocabulary), None for the ids only accept_token
    handles right: special ids (padding included), which it refuses, and stop ids, which end it."""
    texts = list(info.decoded_vocab)
    for t in list(info.special_token_ids) + list(info.stop_token_ids):
        texts[t] = None
    return texts


class GrammarCompiler:
    """Compiles constraints for one tokenizer on a worker thread (results are cached futures), and
    builds each step's mask from its requests' matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], device: torch.device,
                 mask_threads: int | None = None, rows_per_thread: int = ROWS_PER_THREAD):
        self.vocab_size = vocab_size  # the logits' width: ids past the tokenizer's are never allowed
        # The grammars' width: the tokenizer's ids only (grammar_width), known with the first compile.
        self.grammar_vocab: int | None = None
        self.device = torch.device(device)
        self._mask_threads = mask_threads  # None: from torch's thread count at the first mask
        self._rows_per_thread = rows_per_thread
        self._filler: MaskFiller | None = None  # built with the first mask (it imports xgrammar)
        self._bitmask: BitmaskBuffer | None = None
        self._tokenizer = tokenizer
        self._stop_token_ids = sorted(stop_token_ids)
        self._xgr_compiler = None  # built on the worker: TokenizerInfo reads the whole vocabulary
        self._token_texts: list | None = None  # token_texts(), built with it (0.2 s at a 128k vocabulary)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._cache: OrderedDict[tuple[str, str], concurrent.futures.Future] = OrderedDict()
        self._lock = threading.Lock()  # add_request may run on a caller's thread

    def compile(self, constraint: tuple[str, str]) -> concurrent.futures.Future:
        """A future of the CompiledConstraint for (kind, text), started now unless cached."""
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

    def _compile(self, kind: str, text: str) -> CompiledConstraint:
        import xgrammar as xgr

        if self._xgr_compiler is None:
            self.grammar_vocab = grammar_width(self._tokenizer, self.vocab_size, self._stop_token_ids)
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.grammar_vocab,
                                                      stop_token_ids=self._stop_token_ids)
            self._token_texts = token_texts(info)
            # xgrammar's own cache (0.2.9) keys grammars by a printed form that loses characters
            # below U+0100 ({"enum": ["café1"]} came back as "cafຑ"); ours, by constraint text, is exact.
            self._xgr_compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        return CompiledConstraint(self._xgr_compiler.compile_grammar(xgrammar_grammar(kind, text)),
                                  kind in TEXT_LEVEL_KINDS)

    def mask(self, requests: Sequence, rows: Sequence = ()) -> TokenMask | None:
        """The mask of a step's sampling rows (Requests), None when none is constrained: unconstrained
        batches pay nothing. Each constrained row's matcher first consumes the tokens noted since
        the last mask. Finished requests (stopped on a token read back late) are not masked: their
        token is dropped anyway. `rows` (the step's BatchRows, for listeners) are told how many
        tokens each constrained row's mask allowed."""
        constrained = [i for i, r in enumerate(requests) if r.grammar is not None and not r.finished]
        if not constrained:
            return None
        if self._filler is None:
            # xgrammar's "auto" counts the host's cores; in a container with a CPU quota that oversubscribes.
            threads = self._mask_threads or max(1, min(8, torch.get_num_threads()))
            self._filler = MaskFiller(threads, self._rows_per_thread)
            self._bitmask = BitmaskBuffer(words_per_row(self.grammar_vocab), pinned=self.device.type == "cuda")
        mask = TokenMask(self._bitmask, constrained, len(requests), self.grammar_vocab)
        grammars = [requests[i].grammar for i in constrained]
        matchers = [g.matcher for g in grammars]
        texts = self._token_texts  # set before any grammar was ready
        token_ids = [g.take_unaccepted() for g in grammars]  # kept for the error: inputs may be texts
        inputs = [g.matcher_inputs(ids, texts) for g, ids in zip(grammars, token_ids)]
        refused = self._filler.run(matchers, inputs, mask.bitmask, constrained)
        # What fails one request fails it alone, never its batch: the engine finishes these with
        # reason "error" before their row's token is used.
        for row in mask.dead_ends():
            mask.failures[row] = DEAD_END
        for i in refused:  # their bitmask rows were left as they were: the dead-end check above misses them
            mask.failures[constrained[i]] = (f"one of its tokens {token_ids[i]} passed the grammar's mask but the "
                                             "grammar refused it: this is a bug in the engine, please report it")
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
        """Stop the compile thread and the mask's fill threads (after the step loop has stopped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._filler is not None:
            self._filler.close()


def grammar_width(tokenizer, logits_width: int, stop_token_ids: Sequence[int] = ()) -> int:
    """How many ids the grammars cover: the tokenizer's (its highest id + 1, or a stop id's past it:
    xgrammar drops stop ids outside its vocabulary, and a grammar could then never end), at most
    the logits'.
    Not the logits' width: a padded vocabulary's extra ids are special ids to xgrammar, and every
    one of them costs each accept and each mask fill (the 1B benchmark shape pads a 49k tokenizer
    to 128k: ~40x a free string's fill); they are forbidden in constrained rows when the mask is
    applied instead."""
    highest = max([*tokenizer.get_vocab().values(), *stop_token_ids], default=-1)
    return min(logits_width, max(len(tokenizer), highest + 1))


def words_per_row(vocab_size: int) -> int:
    """int32 words in a bitmask row of this vocabulary (xgrammar's layout: one bit per token)."""
    return -(-vocab_size // 32)


class RequestGrammar:
    """One request's place in its grammar: its matcher, and the sampled tokens it has yet to consume."""

    def __init__(self, compiled: concurrent.futures.Future):
        self._compiled = compiled
        self._matcher = None
        self._text_level = False  # its CompiledConstraint's, known with the matcher
        self._stop_token_ids: frozenset[int] = frozenset()
        self._unaccepted: list[int] = []
        self.terminated = False  # the grammar accepted a stop token: nothing may follow

    @property
    def ready(self) -> bool:
        return self._compiled.done()

    @property
    def matcher(self):
        if self._matcher is None:
            import xgrammar as xgr

            compiled = self._compiled.result()
            self._matcher = xgr.GrammarMatcher(compiled.grammar)
            self._text_level = compiled.text_level
            self._stop_token_ids = frozenset(self._matcher.stop_token_ids)
        return self._matcher

    def accept(self, token_id: int) -> None:
        """Note a sampled token; the next mask's fill consumes it, together with the batch's other
        rows, in its batch calls. A stop token ends the request, so it is consumed now: a grammar
        that refuses to end there (the mask should prevent that) is a bug reported here."""
        self._unaccepted.append(token_id)
        matcher = self.matcher  # built on the first token, with the stop tokens it knows
        if token_id in self._stop_token_ids:
            tokens = self.take_unaccepted()
            if not all(matcher.accept_token(t) for t in tokens):
                raise RuntimeError(f"one of tokens {tokens} passed the grammar's mask but the grammar refused "
                                   "it: this is a bug")
            self.terminated = matcher.is_terminated()

    def take_unaccepted(self) -> list[int]:
        """The tokens noted since the last call, for the caller to feed to the matcher."""
        tokens, self._unaccepted = self._unaccepted, []
        return tokens

    def matcher_inputs(self, token_ids: list[int], texts: list) -> list[int | bytes]:
        """What the matcher is given for `token_ids`: each token's text (texts: token_texts()) where
        the matcher is text-level and the token has one; its id otherwise (special, stop, empty text)."""
        return [texts[t] or t for t in token_ids] if self._text_level and token_ids else token_ids


# Why a request whose grammar allows no next token fails: validation only sees the first step.
DEAD_END = ("its constraint allows no next token after the text so far (and does not allow it to end "
            "there): part of the regex, pattern or grammar can match no text; fix the constraint")


class TokenMask:
    """The batch's allowed tokens: a flag per sampling row (constrained or not) and a bitmask row at
    the grammar's vocabulary width, filled on the host for the constrained rows only (by
    GrammarCompiler.mask), applied on the device in one kernel (kernels/token_mask.py, or inside the
    sampler's fused race, kernels/race_sample.py), which also forbids the ids past the grammar's
    vocabulary (a padded model's) in constrained rows.
    Valid until the next mask is built: they share one host buffer."""

    def __init__(self, buffer: BitmaskBuffer, rows: list[int], batch: int, grammar_vocab: int):
        self.grammar_vocab = grammar_vocab
        self.rows = rows
        self._whole, self.flags, self.bitmask = buffer.rows(batch, rows)
        self._buffer = buffer
        self.failures: dict[int, str] = {}  # row -> why its request must fail (GrammarCompiler.mask)

    def dead_ends(self) -> list[int]:
        """Constrained rows whose mask allows no token at all (not even a stop token): the grammar
        reached a state no text gets out of. One OR over each row's words (~18 us at 128 rows and a
        49k vocabulary on the 2-core box; numpy's any() took twice that)."""
        words = self.bitmask.numpy()
        tail = self._last_word_bits().view(np.int32)
        live = (np.bitwise_or.reduce(words[:, :-1], axis=1) != 0) | ((words[:, -1] & tail) != 0)
        return [row for row in self.rows if not live[row]]

    def allowed_counts(self) -> dict[int, int]:
        """Row -> tokens its mask allows this step (for StepEvents: the grammar narrowing the choice).
        One popcount over the constrained rows: unpacking bits row by row took 23 ms at batch 128
        and a 128k vocabulary, on the step thread of any engine with a listener."""
        words = self.bitmask.numpy()[self.rows].view(np.uint32)  # a copy: its padding can be cleared
        words[:, -1] &= self._last_word_bits()
        # 64-bit words, where a row has an even number of 32-bit ones, halve the work.
        counts = np.bitwise_count(words.view(np.uint64) if words.shape[1] % 2 == 0 else words).sum(axis=1)
        return dict(zip(self.rows, counts.tolist()))

    def _last_word_bits(self) -> np.uint32:
        """The bits of a row's last word that stand for ids inside the grammar's vocabulary."""
        return np.uint32((1 << (self.grammar_vocab - 32 * (self.bitmask.shape[1] - 1))) - 1)

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(bitmask, flags) uploaded to the CUDA device, behind the work already queued there (one copy)."""
        on_device = self._buffer.upload(self._whole, device)
        batch = self.flags.shape[0]
        return on_device[self._buffer.flag_words(batch):].view(batch, -1), on_device[:batch]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Set disallowed logits to -inf, in place on the constrained rows."""
        if logits.device.type == "cuda":
            from ..kernels import apply_token_mask

            return apply_token_mask(logits, *self.on_device(logits.device), self.grammar_vocab)
        import xgrammar as xgr

        if logits.dtype != torch.float32:
            logits = logits.float()  # xgrammar's CPU kernel takes float32 only
        xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=self.grammar_vocab, indices=self.rows)
        if logits.shape[1] > self.grammar_vocab:  # a padded vocabulary's ids: never in a grammar
            logits[self.rows, self.grammar_vocab:] = float("-inf")
        return logits
