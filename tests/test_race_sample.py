"""The fused sampling kernel (kernels/race_sample.py) against its torch twin on fresh random inputs,
the twin's Philox against Random123's known answers, and the race's distribution.

On a CPU-only machine conftest.py turns on Triton's interpreter; the GPU tests at the bottom draw
with the kernel itself on the card."""

import importlib
import math

import pytest
import torch

from lightllm_nb.kernels import race_sample, race_sample_torch
from lightllm_nb.kernels.race_sample import BLOCK, philox_torch, race_noise_torch, race_scores_torch


def _random_batch(gen, rows, width, dtype=torch.float32, greedy_rows=(0,)):
    logits = (torch.randn(rows, width, generator=gen) * 3).to(dtype)
    temperatures = torch.rand(rows, generator=gen) * 1.5 + 0.1
    temperatures[list(greedy_rows)] = 0.0
    keys = torch.randint(-2**63, 2**63 - 1, (rows,), generator=gen)
    draws = torch.randint(0, 2**40, (rows,), generator=gen)
    return logits, temperatures, keys, draws


def _assert_same_choice(kernel_tokens, twin_scores):
    """The kernel's token is the twin's argmax, or (float rounding of the noise's logs on another
    device) ties it within 1e-5."""
    chosen = twin_scores.gather(1, kernel_tokens[:, None]).squeeze(1)
    best = twin_scores.max(dim=1).values
    close = (chosen == best) | (best - chosen <= 1e-5 * best.abs().clamp(min=1))
    assert torch.all(close), (kernel_tokens, chosen, best)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(3, 70), (5, 2500), (2, 5000), (1, 4 * BLOCK)])
def test_kernel_matches_the_twin_and_counts_the_draw(dtype, rows, width):
    gen = torch.Generator().manual_seed(rows * 7919 + width)
    logits, temperatures, keys, draws = _random_batch(gen, rows, width, dtype)
    kernel_draws, twin_draws = draws.clone(), draws.clone()
    tokens = race_sample(logits, temperatures, keys, kernel_draws)
    scores = race_scores_torch(logits, temperatures, keys, draws)
    assert tokens.dtype == torch.int64 and tokens.shape == (rows,)
    _assert_same_choice(tokens, scores)
    assert torch.equal(tokens, race_sample_torch(logits, temperatures, keys, twin_draws))
    assert torch.equal(kernel_draws, draws + 1) and torch.equal(twin_draws, draws + 1)


def test_kept_split_counters_come_back_at_zero():
    gen = torch.Generator().manual_seed(4)
    logits, temperatures, keys, draws = _random_batch(gen, 2, 3 * BLOCK)
    counters = torch.zeros(5, dtype=torch.int32)
    first = race_sample(logits, temperatures, keys, draws.clone(), split_counters=counters)
    assert counters.tolist() == [0] * 5
    assert torch.equal(race_sample(logits, temperatures, keys, draws.clone(), split_counters=counters), first)
    with pytest.raises(ValueError, match="split_counters must be int32 zeros, at least 2"):
        race_sample(logits, temperatures, keys, draws, split_counters=torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("rows", [1, 8, 32, 127, 128, 300])
def test_a_batch_puts_enough_programs_on_every_multiprocessor(monkeypatch, rows):
    """About PROGRAMS_PER_SM programs a multiprocessor whatever the batch (a 132-SM card, a 128k
    vocabulary), and never more splits than the row has blocks or the merge was compiled for."""
    module = importlib.import_module("lightllm_nb.kernels.race_sample")

    monkeypatch.setattr(module, "_multiprocessors", lambda device: 132)
    cuda, width = torch.device("cuda"), 128256
    blocks = -(-width // BLOCK)
    splits = module.num_splits(rows, width, cuda)
    assert 1 <= splits <= min(blocks, module.max_splits(width, cuda))
    assert rows * splits >= min(rows * blocks, module.PROGRAMS_PER_SM * 132)


def test_the_token_does_not_depend_on_how_a_row_is_split(monkeypatch):
    module = importlib.import_module("lightllm_nb.kernels.race_sample")

    gen = torch.Generator().manual_seed(12)
    logits, temperatures, keys, draws = _random_batch(gen, 3, 6 * BLOCK + 5)
    tokens = []
    for splits in (1, 2, 3, 7):
        monkeypatch.setattr(module, "num_splits", lambda rows, width, device, n=splits: n)
        tokens.append(race_sample(logits, temperatures, keys, draws.clone()))
    assert all(torch.equal(t, tokens[0]) for t in tokens)


def test_greedy_rows_take_the_first_of_tied_maxima_like_argmax():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 3000, generator=gen)
    for row, ties in enumerate([(5, 2999), (1024, 1025), (0, 2048), (700, 1800, 2900)]):
        logits[row, list(ties)] = 10.0
    temperatures, keys, draws = torch.zeros(4), torch.arange(4), torch.zeros(4, dtype=torch.int64)
    assert race_sample(logits, temperatures, keys, draws).tolist() == [5, 1024, 0, 700]
    assert race_sample(logits, temperatures, keys, draws).tolist() == logits.argmax(-1).tolist()


def test_masked_rows_draw_only_allowed_ids_and_others_are_untouched():
    gen = torch.Generator().manual_seed(5)
    rows, width, grammar_vocab = 6, 2200, 2100
    logits, temperatures, keys, draws = _random_batch(gen, rows, width)
    logits[:, grammar_vocab:] = 50.0  # a padded vocabulary's ids the model prefers: never in a grammar
    bitmask = torch.zeros(rows, -(-grammar_vocab // 32), dtype=torch.int32)
    allowed = {row: torch.randint(0, grammar_vocab, (3,), generator=gen).tolist() for row in range(rows)}
    for row, ids in allowed.items():
        for i in ids:
            bitmask[row, i // 32] |= torch.tensor(1 << (i % 32)).to(torch.int32)
    flags = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.int32)
    tokens = race_sample(logits, temperatures, keys, draws.clone(), bitmask, flags, grammar_vocab)
    for row in range(rows):
        if flags[row]:
            assert tokens[row].item() in allowed[row]
    unmasked = race_sample(logits, temperatures, keys, draws.clone())
    assert tokens[flags == 0].tolist() == unmasked[flags == 0].tolist()
    assert all(t >= grammar_vocab for t in unmasked[flags == 0].tolist()), "unflagged rows keep the padded ids"
    _assert_same_choice(tokens, race_scores_torch(logits, temperatures, keys, draws, bitmask, flags, grammar_vocab))


def test_the_kernel_reads_a_row_slice_of_wider_logits():
    gen = torch.Generator().manual_seed(8)
    wide = torch.randn(3, 1500, generator=gen)
    logits = wide[:, :1300]
    _, temperatures, keys, draws = _random_batch(gen, 3, 1300)
    tokens = race_sample(logits, temperatures, keys, draws.clone())
    assert torch.equal(tokens, race_sample(logits.contiguous(), temperatures, keys, draws.clone()))
    assert tokens.max().item() < 1300


def test_a_rows_noise_depends_only_on_its_key_and_draw():
    gen = torch.Generator().manual_seed(2)
    keys = torch.randint(-2**63, 2**63 - 1, (4,), generator=gen)
    draws = torch.tensor([0, 1, 2**32 + 5, 9])
    noise = race_noise_torch(keys, draws, 3000)
    alone = race_noise_torch(keys[2:3], draws[2:3], 3000)
    assert torch.equal(noise[2], alone[0]), "the same stream in any batch and row"
    assert not torch.equal(race_noise_torch(keys[:1], draws[:1] + 1, 3000), noise[:1]), "each draw is new"
    assert not torch.equal(race_noise_torch(keys[:1] ^ 1, draws[:1], 3000), noise[:1]), "each key is its own"
    assert torch.isfinite(noise).all()


def test_the_noise_is_standard_gumbel():
    keys = torch.arange(40, dtype=torch.int64) * 7 + 3
    noise = race_noise_torch(keys, torch.zeros(40, dtype=torch.int64), 5000).double().flatten()
    # 200k samples: the mean's std is 0.0029, the variance's about 0.0096; tolerances are ~7 of them.
    assert noise.mean().item() == pytest.approx(0.5772156649, abs=0.02)
    assert noise.var().item() == pytest.approx(math.pi ** 2 / 6, abs=0.07)
    cdf = torch.exp(-torch.exp(-torch.tensor([-1.0, 0.0, 1.0, 3.0], dtype=torch.float64)))
    observed = torch.stack([(noise <= x).double().mean() for x in (-1.0, 0.0, 1.0, 3.0)])
    torch.testing.assert_close(observed, cdf, atol=0.008, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_the_race_draws_from_the_softmax_of_the_scaled_logits(temperature):
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    draws = 20_000
    logits = probs.log().expand(draws, -1).contiguous()
    keys = torch.randint(-2**63, 2**63 - 1, (draws,), generator=torch.Generator().manual_seed(int(temperature * 10)))
    tokens = race_sample_torch(logits, torch.full((draws,), temperature), keys, torch.zeros(draws, dtype=torch.int64))
    expected = torch.softmax(probs.log() / temperature, dim=0).double()
    observed = torch.bincount(tokens, minlength=5).double() / draws
    torch.testing.assert_close(observed, expected, atol=0.025, rtol=0)  # seven binomial stds at 20k


def test_the_twins_philox_gives_random123s_known_answers():
    vectors = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
               ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
               ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
                (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
    for counter, key, expected in vectors:
        out = philox_torch(*[torch.tensor([v]) for v in counter + key])
        assert tuple(int(o) for o in out) == expected


def test_bad_inputs_are_refused_with_what_to_pass():
    logits = torch.zeros(2, 64)
    temperatures, keys, draws = torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="temperatures must be"):
        race_sample(logits, torch.ones(3), keys, draws)
    with pytest.raises(ValueError, match="keys must be"):
        race_sample(logits, temperatures, keys.int(), draws)
    with pytest.raises(ValueError, match="go together"):
        race_sample(logits, temperatures, keys, draws, bitmask=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous last dim"):
        race_sample(torch.zeros(64, 2).t(), temperatures, keys, draws)


# ---- on the card ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("rows,width", [(1, 128256), (8, 49152), (128, 128256), (300, 151936)])
def test_gpu_kernel_matches_the_twin(rows, width):
    gen = torch.Generator().manual_seed(rows + width)
    logits, temperatures, keys, draws = _random_batch(gen, rows, width, torch.bfloat16, greedy_rows=range(0, rows, 3))
    cuda = [t.cuda() for t in (logits, temperatures, keys, draws)]
    tokens = race_sample(*cuda)
    _assert_same_choice(tokens.cpu(), race_scores_torch(logits, temperatures, keys, draws))
    assert torch.equal(cuda[3].cpu(), draws + 1)


@pytest.mark.gpu
def test_gpu_race_draws_from_the_softmax():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05] + [0.0] * 1995)
    draws = 200_000
    logits = probs.log().expand(draws, -1).contiguous().cuda()
    keys = torch.randint(-2**63, 2**63 - 1, (draws,), generator=torch.Generator().manual_seed(0)).cuda()
    tokens = race_sample(logits, torch.full((draws,), 0.7, device="cuda"), keys,
                         torch.zeros(draws, dtype=torch.int64, device="cuda"))
    expected = torch.softmax(probs[:5].log() / 0.7, dim=0).double()
    observed = torch.bincount(tokens.cpu(), minlength=2000).double() / draws
    assert observed[5:].sum() == 0
    torch.testing.assert_close(observed[:5], expected, atol=0.008, rtol=0)  # seven binomial stds at 200k
