"""Residuals read while answers are written (esr_train.decode_residuals): the same
vectors a separate forward pass over prompt + answer gives, for rows that join, finish
early and leave a refilling batch, on tiny Llama and Gemma 3 models."""

from __future__ import annotations

from collections import Counter

import torch

from esr_train.decode_residuals import _LayerReader, write_and_read
from esr_train.decoding import decode, stream_decode
from esr_train.generation import generate
from tests.test_decoding import CharTokenizer, TEXTS


def test_residuals_read_in_the_decode_equal_a_forward_over_each_answer(tiny_model):
    """Per prompt, the sum and count of the layer's outputs over the generated tokens the
    loop fed back (all but the last) equal those of one unpadded forward pass over the
    prompt and that answer; prompt passes and the padding fed to finished rows are not
    counted. Batch 16 over 18 prompts: rows refill, finish early (an EOS that occurs), wait
    in the batch fed padding until enough have finished (``DROP_SHARE``), and are dropped."""
    tok, layer, n_new = CharTokenizer(), 1, 10
    prompts = tok([f"{t} {i}" for i in range(3) for t in TEXTS])["input_ids"]
    full = decode(tiny_model, prompts, max_new_tokens=n_new, batch_size=16, eos_token_id=[10_000])
    eos = Counter(t for row in full for t in row[1:]).most_common(1)[0][0]
    with _LayerReader(tiny_model, layer) as reader:
        answers = dict(stream_decode(tiny_model, prompts, max_new_tokens=n_new, batch_size=16, eos_token_id=[eos],
                                     pad_token_id=0, observer=reader))
    lengths = torch.tensor([len(answers[i]) for i in range(len(prompts))])
    assert (lengths < n_new).any() and (lengths == n_new).any()  # some ended early, some ran out
    total, count = reader.sums(lengths)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt + answers[i][:-1]])
        with torch.no_grad():
            hidden = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0, len(prompt):]
        assert int(count[i]) == len(answers[i]) - 1
        assert torch.allclose(total[i], hidden.float().sum(dim=0), atol=1e-4), i


def test_write_and_read_writes_what_generate_writes():
    """The texts are generate()'s greedy answers (chat-rendered, the same penalty), in the
    caller's order, each count is the answer's token count less one, and each sum is the
    one that prompt gets when written alone (the batch enters longest prompt first)."""
    from esr_train.zoo import load_tokenizer
    from tests.conftest import tiny_llama

    tok = load_tokenizer("smollm2-135m")
    model = tiny_llama(vocab_size=len(tok))
    prompts = ["Describe volcanoes in detail.", "Hi", "Tell me some interesting facts about the moon landing."]
    texts, total, count = write_and_read(model, tok, prompts, 2, max_new_tokens=8, repetition_penalty=1.1,
                                         batch_size=2)
    assert texts == generate(model, tok, prompts, max_new_tokens=8, repetition_penalty=1.1, batch_size=2)
    assert count.tolist() == [7, 7, 7]  # random weights never emit EOS in 8 tokens
    assert total.shape == (3, model.config.hidden_size)
    for i, prompt in enumerate(prompts):
        _, alone, _ = write_and_read(model, tok, [prompt], 2, max_new_tokens=8, repetition_penalty=1.1)
        assert torch.allclose(total[i], alone[0], atol=1e-4), i
