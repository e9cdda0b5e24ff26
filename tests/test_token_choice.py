"""The compiled token choice against transformers' processors and torch's draw: the same greedy
tokens, the same sampled tokens from the same uniform numbers, and the same decoded answers."""

from __future__ import annotations

import pytest
import torch

from esr_train import decoding
from esr_train.speed import token_choice
from esr_train.decoding import Sampling
from tests.conftest import built_kernel, tiny_llama


@pytest.fixture(scope="module")
def kernel():
    return built_kernel(token_choice.load_kernel, "transformers' processors stay")


class _Batch:
    """What ``_choose`` reads of the decode loop's running batch."""

    def __init__(self, ids, pad, logits):
        self.ids, self.pad, self.logits = ids, pad, logits

    def __len__(self):
        return self.ids.shape[0]


def _batch(rows, vocab, width, seed, ties=False):
    """Random scores and histories: left padding of 0..width/2 per row, repeated tokens, and
    (``ties``) scores on a grid of 1/4 so rows hold exact ties."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    if ties:
        logits = (logits * 4).round() / 4
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    ids[:, -3:] = ids[:, -4:-3]  # the same token three times in a row
    pad = torch.randint(0, width // 2 + 1, (rows,), generator=g)
    ids[torch.arange(width)[None, :] < pad[:, None]] = 0  # padding, which the penalty must skip
    return _Batch(ids, pad, logits)


def _refuse_torch_choice(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the compiled token choice should have taken this step")

    monkeypatch.setattr(decoding, "_torch_choice", refuse)


@pytest.mark.parametrize("penalty", [1.0, 1.1, 1.3])
@pytest.mark.parametrize("vocab", [1000, 49152, 77])
def test_greedy_tokens_are_transformers(kernel, monkeypatch, penalty, vocab):
    b = _batch(64, vocab, 40, seed=vocab, ties=True)
    sampling = Sampling(repetition_penalty=penalty)
    expected = decoding._torch_choice(b.ids, b.pad, b.logits, sampling, None)
    before = b.logits.clone()
    _refuse_torch_choice(monkeypatch)
    got = decoding._choose(b, sampling, None)
    assert torch.equal(got, expected)
    assert torch.equal(b.logits, before)  # the scores are read, never written


@pytest.mark.parametrize("penalty,temperature", [(1.1, 0.6), (1.0, 1.0), (1.3, 0.8), (1.1, None)])
@pytest.mark.parametrize("vocab", [1000, 49152, 77])
def test_sampled_tokens_are_torch_s_draw_from_the_same_numbers(kernel, monkeypatch, penalty, temperature, vocab):
    b = _batch(200, vocab, 40, seed=vocab + 1)
    sampling = Sampling(do_sample=True, temperature=temperature, repetition_penalty=penalty)
    expected = decoding._torch_choice(b.ids, b.pad, b.logits, sampling, torch.Generator().manual_seed(5))
    _refuse_torch_choice(monkeypatch)
    got = decoding._choose(b, sampling, torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)


def test_draws_follow_the_distribution_and_never_an_impossible_token(kernel):
    probs = torch.tensor([0.0, 0.1, 0.6, 0.3, 0.0])
    logits = probs.log().repeat(40000, 1)  # -inf for the two impossible tokens
    ids = torch.zeros(40000, 1, dtype=torch.long)
    pad = torch.ones(40000, dtype=torch.long)  # the one history token is padding: no penalty
    sampling = Sampling(do_sample=True, temperature=1.0, repetition_penalty=1.5)
    rand = token_choice.uniforms(40000, torch.Generator().manual_seed(0))
    draws = token_choice.compiled_choice(kernel, ids, pad, logits, sampling, rand)
    share = torch.bincount(draws, minlength=5).double() / len(draws)
    assert share[0] == 0 and share[4] == 0
    assert torch.allclose(share[1:4], probs[1:4].double(), atol=0.01)
    # the extremes of the uniform number: the first and the last possible token
    ends = token_choice.compiled_choice(kernel, ids[:2], pad[:2], logits[:2], sampling,
                                        torch.tensor([[0.9999999], [0.0]]))
    assert ends.tolist() == [1, 3]


def test_a_row_with_nan_or_inf_scores_is_left_to_torch(kernel):
    b = _batch(6, 500, 10, seed=3)
    b.logits[1, 7] = float("nan")
    b.logits[4, 9] = float("inf")
    for sampling in (Sampling(do_sample=True, temperature=0.7, repetition_penalty=1.1), Sampling(repetition_penalty=1.1)):
        rand = token_choice.uniforms(6, torch.Generator().manual_seed(1)) if sampling.do_sample else None
        raw = token_choice.compiled_choice(kernel, b.ids, b.pad, b.logits, sampling, rand)
        assert raw[1] == -1
        assert (raw[4] == -1) == sampling.do_sample  # greedy takes the +inf; sampling leaves it to softmax
        expected = decoding._torch_choice(b.ids, b.pad, b.logits, sampling, torch.Generator().manual_seed(1))
        got = decoding._choose(b, sampling, torch.Generator().manual_seed(1))
        assert torch.equal(got, expected)


def test_top_k_and_top_p_keep_transformers_processors():
    logits = torch.zeros(2, 10)
    assert token_choice.takes(Sampling(do_sample=True, temperature=0.6, repetition_penalty=1.1), logits)
    assert not token_choice.takes(Sampling(do_sample=True, top_k=50), logits)
    assert not token_choice.takes(Sampling(do_sample=True, top_p=0.9), logits)
    assert not token_choice.takes(Sampling(), logits.double())


@pytest.mark.parametrize("do_sample", [False, True])
def test_decoded_answers_are_the_same_with_either_choice(kernel, monkeypatch, do_sample):
    model = tiny_llama(vocab_size=300)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7, 4)]
    kw = dict(max_new_tokens=24, batch_size=4, eos_token_id=2, pad_token_id=0,
              sampling=Sampling(do_sample=do_sample, temperature=0.7 if do_sample else None, repetition_penalty=1.2))
    with monkeypatch.context() as m:
        m.setattr(token_choice, "load_kernel", lambda *a: None)
        expected = decoding.decode(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
    _refuse_torch_choice(monkeypatch)
    got = decoding.decode(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
    assert got == expected
    assert sum(map(len, got)) > 6 * 5  # the answers are not all cut at once
