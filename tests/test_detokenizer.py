"""The incremental detokenizer's decode shortcut is the tokenizer's own decode, and streamed text
equals the text of the whole output."""

import copy
import random

import pytest

from lightllm_nb.engine.detokenizer import IncrementalDetokenizer, text_decoder


def _random_windows(seed: int, vocab: int, count: int = 300):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(0, 8))] for _ in range(count)]


def test_the_shortcut_decodes_as_the_tokenizer_does(demo_tokenizer):
    decode = text_decoder(demo_tokenizer)
    specials = list(demo_tokenizer.all_special_ids)
    for ids in _random_windows(random.randrange(1 << 30), len(demo_tokenizer)):
        ids = ids + random.sample(specials, k=min(1, len(specials)))  # skipped by both
        assert decode(ids) == demo_tokenizer.decode(ids, skip_special_tokens=True)


def test_a_tokenizer_that_cleans_up_spaces_keeps_its_own_decode(demo_tokenizer):
    cleaning = copy.deepcopy(demo_tokenizer)
    cleaning.clean_up_tokenization_spaces = True
    calls = []
    original = cleaning.decode
    cleaning.decode = lambda ids, **kw: calls.append(ids) or original(ids, **kw)
    assert text_decoder(cleaning)([1, 2, 3]) == original([1, 2, 3], skip_special_tokens=True)
    assert calls == [[1, 2, 3]]  # the clean-up is the tokenizer's business: not bypassed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_deltas_add_up_to_the_whole_text(demo_tokenizer, seed):
    rng = random.Random(seed)
    prompt = [rng.randrange(len(demo_tokenizer)) for _ in range(10)]
    output = [rng.randrange(len(demo_tokenizer)) for _ in range(60)]
    detok = IncrementalDetokenizer(demo_tokenizer, prompt, ())
    streamed = ""
    for token in output:
        detok.add(token)
        streamed += detok.take_delta(final=False)
    streamed += detok.take_delta(final=True)
    whole = demo_tokenizer.decode(prompt[-4:] + output, skip_special_tokens=True)
    prefix = demo_tokenizer.decode(prompt[-4:], skip_special_tokens=True)
    assert whole.startswith(prefix + streamed)
    assert whole[len(prefix + streamed):].strip("\ufffd") == ""  # only an unfinished character is held back
