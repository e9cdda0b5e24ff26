"""Linears packed for decoding (oneDNN's blocked layout): the same products, the plain
weights back bit for bit afterwards (also after an error or an early close), what is
left plain, and decode outputs that match ``model.generate`` token for token."""

from __future__ import annotations

import pytest
import torch

from esr_train.speed import packed_linear as pl
from esr_train.decoding import decode
from tests.conftest import tiny_llama

pytestmark = pytest.mark.skipif(not pl.available(), reason="no oneDNN packed linear in this torch build")

PROMPTS = [[5, 17, 33, 9, 41, 7, 12, 3, 4], [8, 3, 22], [40, 41, 42, 43, 44], [9, 9, 9, 10], [20, 21]]


def wide_llama(**config):
    """A tiny Llama wide enough (128 / 256) for its linears to be packed; the head is
    untied unless asked."""
    return tiny_llama(**{**dict(hidden_size=128, intermediate_size=256, vocab_size=256, num_attention_heads=4,
                                num_key_value_heads=2, tie_word_embeddings=False), **config})


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_packed_layers_compute_the_same_logits_and_free_the_plain_weights():
    model = wide_llama()
    before = _weights(model)
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with pl.packed_linears(model, rows=4):
            up = model.model.layers[0].mlp.up_proj
            assert up.weight.numel() == 0, "the plain copy is freed while the packed one serves"
            packed = model(input_ids=ids).logits
            batch = model(input_ids=torch.tensor([PROMPTS[0]] * 7)).logits  # another row count than packed for
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[3:4], plain, atol=1e-5, rtol=1e-5)
    assert _same(_weights(model), before)


def test_weights_come_back_after_an_error_inside_the_block():
    model = wide_llama()
    before = _weights(model)
    with pytest.raises(KeyError):
        with pl.packed_linears(model, rows=2):
            raise KeyError("stop")
    assert _same(_weights(model), before)
    assert "forward" not in vars(model.lm_head)


def test_gradient_through_a_packed_layer_is_refused():
    model = wide_llama()
    x = torch.randn(1, 128, requires_grad=True)
    with pl.packed_linears(model, rows=1):
        with pytest.raises(RuntimeError, match="packed for decoding"):
            model.model.layers[0].mlp.up_proj(x)


def test_what_stays_plain(monkeypatch):
    small = tiny_llama()  # 64 wide: under MIN_FEATURES
    assert pl._candidates(small) == []
    tied = wide_llama(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    heads = [m for m, is_tied in pl._candidates(tied) if is_tied]
    assert heads == [tied.lm_head], "a small tied head is packed, as a copy"
    monkeypatch.setattr(pl, "TIED_HEAD_SHARE", 0.01)
    assert all(m is not tied.lm_head for m, _ in pl._candidates(tied)), "a large tied head stays plain"
    with torch.inference_mode(), pl.packed_linears(tied, rows=2):
        assert tied.model.embed_tokens.weight.numel() > 0
    monkeypatch.setenv("ESR_SPEED", "off")
    assert not pl.available()


def test_lora_matrices_stay_plain_and_their_base_layers_are_packed():
    from peft import LoraConfig, get_peft_model

    # r=128: wide enough that only the name rule keeps the LoRA matrices plain
    model = get_peft_model(wide_llama(), LoraConfig(r=128, target_modules=["q_proj", "v_proj"]))
    names = {id(m): n for n, m in model.named_modules()}
    packed = [names[id(m)] for m, _ in pl._candidates(model)]
    assert any(n.endswith("q_proj.base_layer") for n in packed)
    assert not any("lora_" in n for n in packed)


def test_decode_with_packed_layers_matches_generate_token_for_token(monkeypatch):
    model = wide_llama()
    calls = []
    make = pl._packed_forward

    def counting(packed, bias):
        forward = make(packed, bias)
        return lambda x: calls.append(x.shape[0]) or forward(x)

    monkeypatch.setattr(pl, "_packed_forward", counting)
    before = _weights(model)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             pad_token_id=0, eos_token_id=[10_000])[:, width:].tolist()
    with torch.inference_mode():
        got = decode(model, PROMPTS, max_new_tokens=10, batch_size=2, eos_token_id=[10_000], pad_token_id=0)
    assert got == ref
    assert calls, "decode ran on the packed layers"
    assert _same(_weights(model), before)


def test_two_interleaved_decodes_on_one_model_leave_it_whole(monkeypatch):
    """Two decode iterators on the same model, the first closed before the second ends;
    the tied head counts as small whatever is freed, so the inner block would pack it again
    if it did not see the outer one's."""
    from esr_train.decoding import stream_decode

    monkeypatch.setattr(pl, "TIED_HEAD_SHARE", 1.0)
    model = wide_llama(tie_word_embeddings=True)
    before = _weights(model)
    with torch.inference_mode():
        alone = decode(model, PROMPTS, max_new_tokens=6, batch_size=2, eos_token_id=[10_000], pad_token_id=0)
        a = stream_decode(model, PROMPTS, max_new_tokens=6, batch_size=2, eos_token_id=[10_000], pad_token_id=0)
        b = stream_decode(model, PROMPTS, max_new_tokens=6, batch_size=2, eos_token_id=[10_000], pad_token_id=0)
        first = next(a)
        got = dict([next(b)])
        a.close()
        got.update(b)
    assert first[1] == alone[first[0]]
    assert [got[i] for i in range(len(PROMPTS))] == alone
    assert _same(_weights(model), before)
    assert "forward" not in vars(model.lm_head)


def test_a_model_decoded_under_inference_mode_can_be_trained_after():
    """The decode runs under ``torch.inference_mode``; weights restored there would be
    inference tensors, and a later training step on the same model (``esr train`` builds
    its steering directions by decoding with the model it then trains) fails with
    "Inference tensors cannot be saved for backward"."""
    model = wide_llama()
    decode(model, PROMPTS[:2], max_new_tokens=3, batch_size=2)
    assert not any(p.is_inference() for p in model.parameters())
    x = torch.randn(2, 128, requires_grad=True)
    model.model.layers[0].mlp.up_proj(x).sum().backward()
    assert x.grad is not None


def test_bfloat16_layers_are_packed_and_come_back_bit_for_bit():
    """bfloat16, the ``auto`` dtype on CPUs with native bf16, packs too there: the same logits
    to bf16 rounding (oneDNN may sum in another order than MKL), the weights restored exactly.
    Without native bf16 it stays plain."""
    from esr_train.dtype import cpu_has_native_bf16

    model = wide_llama().to(torch.bfloat16)
    if not cpu_has_native_bf16():
        assert pl._candidates(model) == [], "bf16 stays plain without native bf16"
        return
    before = _weights(model)
    assert pl._candidates(model), "bf16 linears are candidates"
    ids = torch.tensor([PROMPTS[0]] * 3)
    with torch.inference_mode():
        plain = model(input_ids=ids).logits.float()
        with pl.packed_linears(model, rows=3):
            assert model.model.layers[0].mlp.up_proj.weight.numel() == 0
            packed = model(input_ids=ids).logits.float()
    torch.testing.assert_close(packed, plain, atol=3e-2, rtol=3e-2)
    assert _same(_weights(model), before)
