"""The host side of a constrained step (engine/mask_fill.py, engine/grammar.py): matchers advanced
and bitmask rows filled in batch calls on several threads give the masks of one matcher at a time; a
JSON schema's or regex's matcher moved by token texts gives the masks it gives moved by token ids;
the reused bitmask buffer flags exactly the rows grammars fill; a padded vocabulary's ids are
forbidden in constrained rows only; a refused token, or a mask that allows nothing, fails its
request alone."""

import random
import re

import numpy as np
import pytest
import torch

from lightllm_nb import SamplingParams
from lightllm_nb.engine.grammar import GrammarCompiler, RequestGrammar, token_texts
from lightllm_nb.engine.mask_fill import BitmaskBuffer, MaskFiller
from lightllm_nb.scheduling.request import Request

from structured_schemas import SCHEMAS

xgr = pytest.importorskip("xgrammar")

PHONE = r"\(\d{3}\) \d{3}-\d{4}( ext\. \d{1,4})?"
VOCAB = 49152 + 64  # wider than the tokenizer, as a model's padded vocabulary is
TOKENIZER_VOCAB = 49152  # the demo tokenizer's ids: the grammars' width (grammar_width)


@pytest.fixture(scope="module")
def compiler(demo_tokenizer):
    compiler = GrammarCompiler(demo_tokenizer, VOCAB, [demo_tokenizer.eos_token_id], torch.device("cpu"))
    yield compiler
    compiler.close()


def allowed_ids(bitmask_row: torch.Tensor) -> set[int]:
    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")[:TOKENIZER_VOCAB]
    return set(np.flatnonzero(bits).tolist())


def random_walk(compiled, steps: int, rng: random.Random) -> list[int]:
    """Tokens a matcher accepts, each drawn among those its mask allows."""
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, TOKENIZER_VOCAB)
    tokens = []
    for _ in range(steps):
        matcher.fill_next_token_bitmask(bitmask)
        allowed = sorted(allowed_ids(bitmask[0]) - set(matcher.stop_token_ids))
        if not allowed:
            break
        tokens.append(rng.choice(allowed))
        assert matcher.accept_token(tokens[-1])
    return tokens


def test_grammars_cover_the_tokenizers_ids_not_the_padded_logits(compiler):
    compiler.compile(SamplingParams(regex=PHONE).constraint).result()
    assert compiler.grammar_vocab == TOKENIZER_VOCAB


def test_a_stop_id_past_the_tokenizer_widens_the_grammars(demo_tokenizer):
    """xgrammar drops stop ids outside its vocabulary (then no grammar could end): the width takes
    them in, still at most the logits'."""
    from lightllm_nb.engine.grammar import grammar_width

    assert grammar_width(demo_tokenizer, VOCAB, [TOKENIZER_VOCAB + 10]) == TOKENIZER_VOCAB + 11
    assert grammar_width(demo_tokenizer, VOCAB, [VOCAB + 10]) == VOCAB
    assert grammar_width(demo_tokenizer, VOCAB, [demo_tokenizer.eos_token_id]) == TOKENIZER_VOCAB


def test_threads_follow_the_batch_size():
    filler = MaskFiller(max_threads=4, rows_per_thread=32)
    assert [filler.threads_for(n) for n in (1, 31, 32, 64, 127, 128, 1000)] == [1, 1, 1, 2, 3, 4, 4]
    assert MaskFiller(max_threads=1).threads_for(1000) == 1


def fill_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "grammar-mask-fill"]


def test_fill_threads_are_started_once_kept_and_stopped(compiler):
    """The fill's threads are ours and kept: started as a batch first needs them, the same ones
    every step after, and gone when the filler is closed, or dropped unclosed."""
    import gc

    compiled = compiler.compile(SamplingParams(regex=PHONE).constraint).result().grammar
    before = set(fill_threads())
    filler = MaskFiller(max_threads=3, rows_per_thread=4)
    bitmask = torch.zeros(xgr.get_bitmask_shape(12, TOKENIZER_VOCAB), dtype=torch.int32)
    for rows in (4, 12, 8, 12):
        filler.run([xgr.GrammarMatcher(compiled) for _ in range(rows)], [[]] * rows, bitmask, list(range(rows)))
        assert bitmask[:rows].any(dim=1).all()
        if rows == 12:
            started = set(fill_threads()) - before
            assert len(started) == 2  # the step's thread fills the third chunk itself
        if rows == 4:
            assert set(fill_threads()) == before
    assert set(fill_threads()) - before == started  # kept: no thread per call
    filler.close()
    assert set(fill_threads()) == before
    dropped = MaskFiller(max_threads=2, rows_per_thread=1)
    dropped.run([xgr.GrammarMatcher(compiled) for _ in range(2)], [[]] * 2, bitmask, [0, 1])
    assert len(set(fill_threads()) - before) == 1
    del dropped
    gc.collect()
    assert set(fill_threads()) == before


def test_a_worker_chunk_that_fails_raises_on_the_step_thread_after_every_chunk_is_done(compiler):
    """An error in a worker's chunk (here: a row index past the bitmask) reaches the caller, and
    the workers still serve the next call."""
    compiled = compiler.compile(SamplingParams(regex=PHONE).constraint).result().grammar
    filler = MaskFiller(max_threads=2, rows_per_thread=2)
    bitmask = torch.zeros(xgr.get_bitmask_shape(4, TOKENIZER_VOCAB), dtype=torch.int32)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(4)]
    with pytest.raises(Exception):
        filler.run(matchers, [[]] * 4, bitmask, [0, 1, 2, 40])
    bitmask.zero_()
    assert filler.run(matchers, [[]] * 4, bitmask, [0, 1, 2, 3]) == []
    assert bitmask.any(dim=1).all()
    filler.close()


def test_rows_filled_on_threads_are_the_rows_one_matcher_at_a_time_gives(compiler):
    compiled = compiler.compile(SamplingParams(regex=PHONE).constraint).result().grammar
    rng = random.Random(0)
    rows = 45  # three threads of 8 rows or more each
    walks = [random_walk(compiled, rng.randrange(0, 14), rng) for _ in range(rows)]
    # Each matcher is behind its walk by 0, 1 or 2 tokens, which the filler accepts first.
    behind = [rng.randrange(0, min(3, len(w) + 1)) for w in walks]
    matchers = []
    for walk, k in zip(walks, behind):
        matcher = xgr.GrammarMatcher(compiled)
        assert all(matcher.accept_token(t) for t in walk[:len(walk) - k])
        matchers.append(matcher)
    filler = MaskFiller(max_threads=3, rows_per_thread=8)
    assert filler.threads_for(rows) == 3
    placed = rng.sample(range(rows + 7), rows)  # rows land anywhere in a wider batch
    bitmask = torch.zeros(xgr.get_bitmask_shape(rows + 7, TOKENIZER_VOCAB), dtype=torch.int32)
    refused = filler.run(matchers, [w[len(w) - k:] for w, k in zip(walks, behind)], bitmask, placed)

    assert refused == []
    for walk, row in zip(walks, placed):
        alone = xgr.GrammarMatcher(compiled)
        assert all(alone.accept_token(t) for t in walk)
        expected = xgr.allocate_token_bitmask(1, TOKENIZER_VOCAB)
        alone.fill_next_token_bitmask(expected)
        assert torch.equal(bitmask[row], expected[0])


def test_a_refused_token_is_reported_and_its_row_left_alone(compiler):
    compiled = compiler.compile(SamplingParams(regex=PHONE).constraint).result().grammar
    digit = compiler._tokenizer.encode("7", add_special_tokens=False)[0]
    paren = compiler._tokenizer.encode("(", add_special_tokens=False)[0]
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(2)]
    bitmask = torch.zeros(xgr.get_bitmask_shape(2, TOKENIZER_VOCAB), dtype=torch.int32)
    assert MaskFiller(max_threads=1).run(matchers, [[paren], [digit]], bitmask, [0, 1]) == [1]
    assert bitmask[0].any() and not bitmask[1].any()


@pytest.mark.parametrize("constraint", [SamplingParams(json_schema=schema).constraint for schema in SCHEMAS.values()]
                         + [SamplingParams(json_schema={}).constraint, SamplingParams(regex=PHONE).constraint,
                            SamplingParams(json_schema={"type": "object", "properties": {"t": {"type": "string",
                                           "minLength": 20, "maxLength": 40}}}).constraint],
                         ids=list(SCHEMAS) + ["any-object", "phone", "bounded-string"])
def test_a_text_level_matcher_moved_by_token_texts_gives_the_masks_of_token_ids(compiler, constraint):
    """What makes accepting by text exact: at every step of random walks both matchers allow the
    same tokens (also the end), though accept_token does more work (xgrammar 0.2.9)."""
    compiled = compiler.compile(constraint).result()
    assert compiled.text_level
    texts = compiler._token_texts
    rng = random.Random(len(constraint[1]))
    by_id_mask, by_text_mask = (xgr.allocate_token_bitmask(1, TOKENIZER_VOCAB) for _ in range(2))
    for _ in range(4):
        by_id, by_text = xgr.GrammarMatcher(compiled.grammar), xgr.GrammarMatcher(compiled.grammar)
        for _ in range(80):
            by_id.fill_next_token_bitmask(by_id_mask)
            by_text.fill_next_token_bitmask(by_text_mask)
            assert torch.equal(by_id_mask, by_text_mask)
            allowed = sorted(allowed_ids(by_id_mask[0]) - set(by_id.stop_token_ids))
            if not allowed:
                break
            token = rng.choice(allowed)
            assert by_id.accept_token(token) and by_text.accept_string(texts[token] or b"")
        if by_id.is_completed():
            assert by_text.accept_token(by_id.stop_token_ids[0]) and by_text.is_terminated()


def test_ebnf_matchers_go_by_id_and_ids_without_plain_text_have_none(compiler, demo_tokenizer):
    """EBNF can name tokens (xgrammar's token-level elements), which only accept_token matches; a
    special or stop id must reach accept_token too (its text would be accepted as characters)."""
    choice = compiler.compile(SamplingParams(choice=["yes", "no"]).constraint).result()
    assert not choice.text_level
    info = xgr.TokenizerInfo.from_huggingface(demo_tokenizer, vocab_size=VOCAB,
                                              stop_token_ids=[demo_tokenizer.eos_token_id])
    texts = token_texts(info)
    assert len(texts) == VOCAB and texts[demo_tokenizer.eos_token_id] is None and texts[VOCAB - 1] is None
    word = demo_tokenizer.encode(" time", add_special_tokens=False)[0]
    assert bytes(texts[word]) == b" time"


def test_refusals_name_their_rows_wherever_they_sit(compiler):
    """Each accept call is asked once whether any of its matchers refused; the ones that did are
    found by index wherever they sit, and only their rows stay as they were (the others are filled
    on several threads)."""
    compiled = compiler.compile(SamplingParams(regex=PHONE).constraint).result().grammar
    digit = compiler._tokenizer.encode("7", add_special_tokens=False)[0]
    paren = compiler._tokenizer.encode("(", add_special_tokens=False)[0]
    rows = 24
    wrong = {1, 11, rows - 1}
    tokens = [[digit] if i in wrong else [paren] for i in range(rows)]
    bitmask = torch.zeros(xgr.get_bitmask_shape(rows, TOKENIZER_VOCAB), dtype=torch.int32)
    filler = MaskFiller(max_threads=3, rows_per_thread=4)
    refused = filler.run([xgr.GrammarMatcher(compiled) for _ in range(rows)], tokens, bitmask, list(range(rows)))
    assert sorted(refused) == sorted(wrong)
    assert [bool(bitmask[i].any()) for i in range(rows)] == [i not in wrong for i in range(rows)]


def test_mask_consumes_noted_tokens_and_a_refused_one_fails_its_request_alone(compiler):
    params = SamplingParams(regex=PHONE)
    tokenizer = compiler._tokenizer
    requests = [Request(f"r{i}", [1, 2], params) for i in range(3)]
    for request in requests[:2]:
        request.grammar = RequestGrammar(compiler.compile(params.constraint))
    for t in tokenizer.encode("(555) 12", add_special_tokens=False):
        requests[0].grammar.accept(t)
    mask = compiler.mask(requests)
    assert mask.rows == [0, 1] and mask.flags.tolist() == [1, 1, 0]  # row 2 unconstrained: left alone
    digits = {tokenizer.encode(str(d), add_special_tokens=False)[0] for d in range(10)}
    allowed = allowed_ids(mask.bitmask[0])
    assert digits <= allowed and tokenizer.encode("(", add_special_tokens=False)[0] not in allowed
    x = tokenizer.encode("x", add_special_tokens=False)[0]
    requests[1].grammar.accept(x)
    # Its request alone is to fail; the message names the token by id, though the matcher was given its text.
    mask = compiler.mask(requests)
    assert list(mask.failures) == [1]
    assert re.match(rf"one of its tokens \[{x}\] passed .* the grammar refused it: this is a bug", mask.failures[1])
    assert digits <= allowed_ids(mask.bitmask[0])  # the other row's mask was still filled


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


def test_the_reused_buffer_flags_exactly_the_filled_rows_and_keeps_its_layout():
    buffer = BitmaskBuffer(words=5, pinned=False)
    whole, flags, bits = buffer.rows(3, [1])
    assert flags.tolist() == [0, 1, 0] and bits.shape == (3, 5) and whole.numel() == 4 + 3 * 5
    # One region: the flags first (padded to 16 bytes, so the rows are aligned), then the rows (one
    # upload carries both).
    assert flags.data_ptr() == whole.data_ptr() and bits.data_ptr() == whole.data_ptr() + 16
    for batch in (1, 4, 5, 127):
        region, _, rows = buffer.rows(batch, [0])
        assert (rows.data_ptr() - region.data_ptr()) % 16 == 0
    bits.fill_(7)
    whole2, flags2, bits2 = buffer.rows(6, [0, 4])  # grows: a new buffer
    assert flags2.tolist() == [1, 0, 0, 0, 1, 0]
    whole3, flags3, bits3 = buffer.rows(6, [4])  # the same buffer again, old flags cleared
    assert flags3.tolist() == [0, 0, 0, 0, 1, 0] and whole3.data_ptr() == whole2.data_ptr()


@pytest.mark.parametrize("vocab", [100, 128, 130])
def test_allowed_counts_are_each_rows_allowed_tokens(vocab):
    from lightllm_nb.engine.grammar import TokenMask
    from lightllm_nb.sampling_params import allowed_token_count

    buffer = BitmaskBuffer(words=-(-vocab // 32), pinned=False)
    mask = TokenMask(buffer, [0, 2, 3], 5, vocab)
    bits = mask.bitmask
    bits.copy_(torch.randint(-2**31, 2**31, bits.shape, generator=torch.Generator().manual_seed(vocab),
                             dtype=torch.int64).to(torch.int32))
    bits[3] = -1  # every token, and the bits past the vocabulary, set
    assert mask.allowed_counts() == {i: allowed_token_count(bits[i], vocab) for i in (0, 2, 3)}
    assert mask.allowed_counts()[3] == vocab


def test_a_padded_vocabularys_ids_are_forbidden_in_constrained_rows_only():
    """The grammar covers the tokenizer's ids; logits wider than that (a padded model) get -inf
    past it in constrained rows, and unconstrained rows keep every logit, on the CPU path."""
    from lightllm_nb.engine.grammar import TokenMask

    grammar_vocab, width = 70, 96
    buffer = BitmaskBuffer(words=-(-grammar_vocab // 32), pinned=False)
    mask = TokenMask(buffer, [1], 3, grammar_vocab)
    mask.bitmask[1] = 0
    mask.bitmask[1, 0] = 0b1010  # ids 1 and 3 allowed
    mask.bitmask[[0, 2]] = 0  # unconstrained rows: their bits are never read
    logits = torch.randn(3, width, generator=torch.Generator().manual_seed(1))
    masked = mask.apply(logits.clone())
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])
    assert masked[1].isfinite().nonzero().flatten().tolist() == [1, 3]


def test_at_interpreter_exit_the_workers_serve_until_their_owner_closes(demo_tokenizer, tmp_path):
    """An engine still open at exit is closed by its finalizer, which runs after those made later:
    had the filler's own finalizer stopped its workers first, a step still filling would give a
    chunk to a stopped worker and wait for it forever. Here the owner's finalizer (made first, so
    run last) still finds the worker alive, fills rows with it, then closes the filler."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "exit_order.py"
    script.write_text(textwrap.dedent(f"""
        import threading, weakref
        import torch, xgrammar as xgr
        from transformers import AutoTokenizer
        from lightllm_nb import SamplingParams
        from lightllm_nb.engine.grammar import GrammarCompiler
        from lightllm_nb.engine.mask_fill import MaskFiller

        class Owner:
            pass

        def close_at_exit():
            alive = [t for t in threading.enumerate() if t.name == "grammar-mask-fill"]
            bitmask.zero_()
            filler.run(matchers, [[]] * 2, bitmask, [0, 1])
            print("workers at the owner's close:", len(alive), "rows filled:", int(bitmask.any(dim=1).sum()))
            filler.close()

        owner = Owner()
        weakref.finalize(owner, close_at_exit)
        tokenizer = AutoTokenizer.from_pretrained({str(demo_tokenizer.name_or_path)!r})
        compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id], torch.device("cpu"))
        compiled = compiler.compile(SamplingParams(regex="[0-9]+").constraint).result().grammar
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(2)]
        bitmask = xgr.allocate_token_bitmask(2, compiler.grammar_vocab)
        filler = MaskFiller(max_threads=2, rows_per_thread=1)
        filler.run(matchers, [[]] * 2, bitmask, [0, 1])
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "workers at the owner's close: 1 rows filled: 2" in done.stdout, done.stdout + done.stderr
