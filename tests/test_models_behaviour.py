"""Behaviour on the real bundled models (loaded from the esr cache; the first run
dequantises them once, which is slow; later runs load the cached safetensors)."""

from __future__ import annotations

import re

import pytest
import torch

from esr_train.concepts import concept_direction, reference_norm
from esr_train.generation import encode, generate, render_prompt
from esr_train.steering import steer

pytestmark = pytest.mark.slow

TASKS = [
    "How do you make a cup of tea?",
    "Explain how to add two fractions.",
    "How do you change a light bulb?",
    "Explain how to write a thank-you note.",
    "How do you fold a fitted sheet?",
    "Explain how to save money on groceries.",
]
VOLCANO = re.compile(r"volcan|lava|magma|erupt", re.I)
SAMPLING = dict(max_new_tokens=60, do_sample=True, repetition_penalty=1.1, seed=0)


@pytest.fixture(scope="module")
def volcano(smollm):
    model, tok = smollm
    return concept_direction(model, tok, "volcanoes", layer=15)


def words_ratio(text: str) -> float:
    """Share of letters among non-space characters: prose and markdown lists score
    0.7-0.85, byte soup or digit runs far lower."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / max(1, len(chars))


def test_smollm_answers_a_chat_prompt(smollm):
    model, tok = smollm
    answer = generate(model, tok, ["How do you make a cup of tea?"], max_new_tokens=50, repetition_penalty=1.1)[0]
    assert re.search(r"\btea\b", answer, re.I) and re.search(r"water|boil|cup", answer, re.I), answer
    assert words_ratio(answer) > 0.7, answer


def test_gemma_answers_a_chat_prompt_in_its_turn_format(gemma):
    model, tok = gemma
    rendered = render_prompt(tok, "How do you make a cup of tea?")
    assert rendered.startswith("<bos><start_of_turn>user\n") and rendered.endswith("<start_of_turn>model\n")
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    answers = generate(model, tok, ["How do you make a cup of tea?"] * 4, max_new_tokens=50,
                       do_sample=True, repetition_penalty=1.1, seed=0)
    on_topic = [a for a in answers if re.search(r"tea|water|cup|drink|boil|brew", a, re.I)]
    assert len(on_topic) >= 2, answers
    assert all(words_ratio(a) > 0.6 for a in on_topic), on_topic
    assert tok.convert_tokens_to_ids("<end_of_turn>") in model.generation_config.eos_token_id


def test_concept_vector_moves_the_text(smollm, volcano):
    model, tok = smollm
    direction = volcano
    assert direction.layer == 15 and direction.reference_norm == pytest.approx(reference_norm(model, tok, 15))
    plain = generate(model, tok, TASKS, **SAMPLING)
    with steer(model, direction, 0.5):
        steered = generate(model, tok, TASKS, **SAMPLING)
    assert sum(bool(VOLCANO.search(a)) for a in plain) == 0, plain
    assert sum(bool(VOLCANO.search(a)) for a in steered) >= 5, steered


def test_zero_strength_reproduces_unsteered_output(smollm, volcano):
    model, tok = smollm
    direction = volcano
    plain = generate(model, tok, TASKS[:3], max_new_tokens=30)
    with steer(model, direction, 0.0):
        assert generate(model, tok, TASKS[:3], max_new_tokens=30) == plain


def test_batched_steered_generation_equals_one_prompt_at_a_time(smollm, volcano):
    model, tok = smollm
    direction = volcano
    prompts = ["How do you boil an egg?", "Explain how to plan a weekly budget for a family of four.", "Hi"]
    with steer(model, direction, 0.3):
        batched = generate(model, tok, prompts, max_new_tokens=30, batch_size=3)
        single = [generate(model, tok, [p], max_new_tokens=30)[0] for p in prompts]
    assert batched == single


def test_decode_loop_equals_hf_generate_on_the_real_model(smollm, volcano):
    """The default engine (finished rows leave, waiting prompts refill the batch) gives the
    same greedy answers as plain ``model.generate`` on SmolLM2, steered and per row."""
    model, tok = smollm
    prompts = ["How do you boil an egg?", "Explain how to plan a weekly budget for a family of four.", "Hi",
               "How do you fold a fitted sheet?", "Name three primary colours."]
    rows = [volcano, None, volcano, volcano, None]
    kw = dict(max_new_tokens=24, batch_size=2, repetition_penalty=1.1, row_steering=rows, strength=0.3)
    assert generate(model, tok, prompts, **kw) == generate(model, tok, prompts, engine="hf", **kw)


def test_sae_round_trip_steers_smollm(smollm, volcano, tmp_path):
    """Build a small sae-lens SAE on SmolLM2's layer-15 width, save it, load it back
    through esr, and steer with one latent."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from esr_train.concepts import with_reference_norm
    from esr_train.sae import load_sae, most_active_latents, sae_direction

    model, tok = smollm
    torch.manual_seed(0)
    cfg = StandardSAEConfig(d_in=576, d_sae=256,
                            metadata=SAEMetadata(hook_name="blocks.15.hook_resid_post", model_name="smollm2-135m"))
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_dec[7] = volcano.vector * 3.0  # latent 7 decodes to the volcano direction
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    d = with_reference_norm(sae_direction(loaded, 7, label="volcanoes"), model, tok)
    assert d.layer == 15 and d.source == "sae" and torch.allclose(d.vector, volcano.vector, atol=1e-5)
    assert 0 < len(most_active_latents(loaded, model, tok, TASKS[:2], k=10)) <= 20
    with steer(model, d, 0.5):
        steered = generate(model, tok, TASKS, **SAMPLING)
    assert sum(bool(VOLCANO.search(a)) for a in steered) >= 5, steered


def test_encode_does_not_double_bos(gemma):
    _, tok = gemma
    enc = encode(tok, [render_prompt(tok, "Hi"), render_prompt(tok, "How are you today?")])
    for row, mask in zip(enc["input_ids"], enc["attention_mask"]):
        real = row[mask.bool()].tolist()
        assert real[0] == tok.bos_token_id and real.count(tok.bos_token_id) == 1
