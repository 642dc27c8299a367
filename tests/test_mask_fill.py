"""The host side of a constrained step (engine/mask_fill.py, engine/grammar.py): matchers advanced
and bitmask rows filled in chunks on several threads give the masks of one matcher at a time; the
reused bitmask buffer allows every token in the rows no grammar fills; a refused token is an error."""

import concurrent.futures
import random
import threading

import numpy as np
import pytest
import torch

from lightllm_nb import SamplingParams
from lightllm_nb.engine.grammar import GrammarCompiler, RequestGrammar
from lightllm_nb.engine.mask_fill import ROWS_PER_THREAD, BitmaskBuffer, MaskFiller
from lightllm_nb.scheduling.request import Request

xgr = pytest.importorskip("xgrammar")

PHONE = r"\(\d{3}\) \d{3}-\d{4}( ext\. \d{1,4})?"
VOCAB = 49152 + 64  # wider than the tokenizer, as a model's padded vocabulary is


@pytest.fixture(scope="module")
def compiler(demo_tokenizer):
    compiler = GrammarCompiler(demo_tokenizer, VOCAB, [demo_tokenizer.eos_token_id], torch.device("cpu"))
    yield compiler
    compiler.close()


def allowed_ids(bitmask_row: torch.Tensor) -> set[int]:
    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")[:VOCAB]
    return set(np.flatnonzero(bits).tolist())


def random_walk(compiled, steps: int, rng: random.Random) -> list[int]:
    """Tokens a matcher accepts, each drawn among those its mask allows."""
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    tokens = []
    for _ in range(steps):
        matcher.fill_next_token_bitmask(bitmask)
        allowed = sorted(allowed_ids(bitmask[0]) - set(matcher.stop_token_ids))
        if not allowed:
            break
        tokens.append(rng.choice(allowed))
        assert matcher.accept_token(tokens[-1])
    return tokens


def test_chunks_on_threads_fill_the_rows_one_matcher_at_a_time_would(compiler):
    compiled = compiler.compile(SamplingParams(regex=PHONE).constraint).result()
    rng = random.Random(0)
    rows = 3 * ROWS_PER_THREAD + 5  # four chunks: the caller's and three helpers'
    walks = [random_walk(compiled, rng.randrange(0, 14), rng) for _ in range(rows)]
    # Each matcher is behind its walk by 0, 1 or 2 tokens, which the filler accepts first.
    behind = [rng.randrange(0, min(3, len(w) + 1)) for w in walks]
    matchers = []
    for walk, k in zip(walks, behind):
        matcher = xgr.GrammarMatcher(compiled)
        assert all(matcher.accept_token(t) for t in walk[:len(walk) - k])
        matchers.append(matcher)
    filler = MaskFiller(max_threads=4)
    assert filler.threads_for(rows) == 3 and filler.threads_for(ROWS_PER_THREAD) == 1
    placed = rng.sample(range(rows + 7), rows)  # rows land anywhere in a wider batch
    bitmask = torch.zeros(xgr.get_bitmask_shape(rows + 7, VOCAB), dtype=torch.int32)
    refused = filler.run(matchers, [w[len(w) - k:] for w, k in zip(walks, behind)], bitmask, placed)
    filler.close()

    assert refused == []
    for walk, row in zip(walks, placed):
        alone = xgr.GrammarMatcher(compiled)
        assert all(alone.accept_token(t) for t in walk)
        expected = xgr.allocate_token_bitmask(1, VOCAB)
        alone.fill_next_token_bitmask(expected)
        assert torch.equal(bitmask[row], expected[0])


def test_a_refused_token_is_reported_and_its_row_left_alone(compiler):
    compiled = compiler.compile(SamplingParams(regex=PHONE).constraint).result()
    digit = compiler._tokenizer.encode("7", add_special_tokens=False)[0]
    paren = compiler._tokenizer.encode("(", add_special_tokens=False)[0]
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(2)]
    bitmask = torch.zeros(xgr.get_bitmask_shape(2, VOCAB), dtype=torch.int32)
    assert MaskFiller(max_threads=1).run(matchers, [[paren], [digit]], bitmask, [0, 1]) == [1]
    assert bitmask[0].any() and not bitmask[1].any()


def test_mask_consumes_noted_tokens_and_a_refused_one_names_its_request(compiler):
    params = SamplingParams(regex=PHONE)
    tokenizer = compiler._tokenizer
    requests = [Request(f"r{i}", [1, 2], params) for i in range(3)]
    for request in requests[:2]:
        request.grammar = RequestGrammar(compiler.compile(params.constraint))
    for t in tokenizer.encode("(555) 12", add_special_tokens=False):
        requests[0].grammar.accept(t)
    mask = compiler.mask(requests)
    assert mask.rows == [0, 1] and (mask.bitmask[2] == -1).all()  # unconstrained: every token
    digits = {tokenizer.encode(str(d), add_special_tokens=False)[0] for d in range(10)}
    allowed = allowed_ids(mask.bitmask[0])
    assert digits <= allowed and tokenizer.encode("(", add_special_tokens=False)[0] not in allowed
    requests[1].grammar.accept(tokenizer.encode("x", add_special_tokens=False)[0])
    with pytest.raises(RuntimeError, match="r1: one of tokens .* the grammar refused it: this is a bug"):
        compiler.mask(requests)


def test_a_stop_token_is_consumed_at_once(compiler, demo_tokenizer):
    params = SamplingParams(choice=["yes", "no"])
    grammar = RequestGrammar(compiler.compile(params.constraint))
    for t in demo_tokenizer.encode("no", add_special_tokens=False):
        grammar.accept(t)
    assert not grammar.terminated
    grammar.accept(demo_tokenizer.eos_token_id)
    assert grammar.terminated
    early = RequestGrammar(compiler.compile(params.constraint))
    early.accept(demo_tokenizer.encode("n", add_special_tokens=False)[0])
    with pytest.raises(RuntimeError, match="the grammar refused it"):  # "n" is not a whole choice yet
        early.accept(demo_tokenizer.eos_token_id)


def test_the_reused_buffer_allows_every_token_outside_the_filled_rows():
    buffer = BitmaskBuffer(words=5, pinned=False)
    first = buffer.rows(3, [1])
    assert (first[[0, 2]] == -1).all()
    first.zero_()  # as if filled by grammars that allow nothing
    second = buffer.rows(6, [0, 4])  # grows: a new buffer
    third = buffer.rows(6, [4])
    assert (third[[0, 1, 2, 3, 5]] == -1).all() and third.data_ptr() == second.data_ptr()
    third.zero_()
    assert (buffer.rows(2, [1])[0] == -1).all() and (buffer.rows(2, [1])[1] == 0).all()


@pytest.mark.parametrize("vocab", [100, 128, 130])
def test_allowed_counts_are_each_rows_allowed_tokens(vocab):
    from lightllm_nb.engine.grammar import TokenMask
    from lightllm_nb.sampling_params import allowed_token_count

    buffer = BitmaskBuffer(words=-(-vocab // 32), pinned=False)
    bits = buffer.rows(5, [0, 2, 3])
    bits.copy_(torch.randint(-2**31, 2**31, bits.shape, generator=torch.Generator().manual_seed(vocab),
                             dtype=torch.int64).to(torch.int32))
    bits[3] = -1  # every token, and the bits past the vocabulary, set
    mask = TokenMask(buffer, bits, [0, 2, 3], vocab)
    assert mask.allowed_counts() == {i: allowed_token_count(bits[i], vocab) for i in (0, 2, 3)}
    assert mask.allowed_counts()[3] == vocab


def test_the_caller_does_the_chunks_of_helpers_that_have_not_started(compiler):
    """A helper that gets no core for a while must not hold up the step: its chunk goes to whoever
    is free, the caller included. Here the only helper is busy for the whole call."""
    compiled = compiler.compile(SamplingParams(regex=PHONE).constraint).result()
    rows = 2 * ROWS_PER_THREAD
    filler = MaskFiller(max_threads=2)
    release = threading.Event()
    filler._helpers = concurrent.futures.ThreadPoolExecutor(1)
    filler._helpers.submit(release.wait)  # the helper is stuck until the call is over
    bitmask = torch.zeros(xgr.get_bitmask_shape(rows, VOCAB), dtype=torch.int32)
    result = []
    caller = threading.Thread(target=lambda: result.append(filler.run(
        [xgr.GrammarMatcher(compiled) for _ in range(rows)], [[]] * rows, bitmask, list(range(rows)))))
    caller.start()
    caller.join(timeout=10)
    release.set()
    filler.close()
    assert result == [[]] and bitmask.any(dim=1).all()
