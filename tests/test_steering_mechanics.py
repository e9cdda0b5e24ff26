"""Steering mechanics on tiny random-init Llama and Gemma 3 models."""

from __future__ import annotations

import pytest
import torch

from esr_train.directions import DirectionError, SteeringDirection, check_direction, load_vector_file
from esr_train.layers import LayerError, decoder_layers, layer_from_hook_name, resolve_layer
from esr_train.steering import Schedule, steer

IDS = torch.tensor([[5, 17, 33, 9, 41, 7, 12]])


def direction(model, layer=1, norm=10.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return SteeringDirection(torch.randn(model.config.hidden_size, generator=g), layer=layer, label="x",
                             reference_norm=norm)


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def test_hooks_removed_and_logits_restored(tiny_model):
    before = logits(tiny_model)
    with steer(tiny_model, direction(tiny_model), 2.0):
        steered = logits(tiny_model)
    assert not torch.allclose(before, steered)
    assert torch.equal(before, logits(tiny_model))
    assert all(not layer._forward_hooks for layer in decoder_layers(tiny_model))


def test_zero_strength_is_identity(tiny_model):
    base = logits(tiny_model)
    with steer(tiny_model, direction(tiny_model), 0.0):
        assert torch.equal(base, logits(tiny_model))


def test_push_is_added_to_the_layer_output(tiny_model):
    d = direction(tiny_model, layer=2, norm=3.0)
    seen = []
    layer = decoder_layers(tiny_model)[2]
    probe = lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())
    h = layer.register_forward_hook(probe)
    try:
        logits(tiny_model)
        with steer(tiny_model, d, 0.5):  # registered after the probe, so the probe sees the raw output
            pass
        h.remove()
        with steer(tiny_model, d, 0.5):
            h = layer.register_forward_hook(probe)  # runs after the steering hook
            logits(tiny_model)
    finally:
        h.remove()
    assert torch.allclose(seen[1] - seen[0], (1.5 * d.vector).expand_as(seen[0]), atol=1e-5)


def test_hooks_removed_on_exception(tiny_model):
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_model, direction(tiny_model), 1.0, schedule="generated"):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in decoder_layers(tiny_model))
    assert not tiny_model.model._forward_pre_hooks


def _gen(model, ids, mask=None, n=8, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                             max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


def test_every_decode_step_is_steered(tiny_model):
    """With the KV cache, decode steps see one token each; steering must act on them
    too. Generation without the cache recomputes every position each step, so the two
    agree only if the cached decode steps were steered as well."""
    d = direction(tiny_model, norm=20.0)
    with steer(tiny_model, d, 1.0):
        cached = _gen(tiny_model, IDS, use_cache=True)
        uncached = _gen(tiny_model, IDS, use_cache=False)
        first_step = _gen(tiny_model, IDS, n=1)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, _gen(tiny_model, IDS))
    assert torch.equal(cached[:, :1], first_step)


def test_generated_schedule_leaves_the_prompt_pass_alone(tiny_model):
    d = direction(tiny_model, norm=50.0)
    plain = _gen(tiny_model, IDS, n=10)
    with steer(tiny_model, d, 1.0, schedule="generated"):
        gen_only = _gen(tiny_model, IDS, n=10)
    with steer(tiny_model, d, 1.0):
        everywhere = _gen(tiny_model, IDS, n=10)
    assert torch.equal(gen_only[:, 0], plain[:, 0])  # first token comes from the unsteered prompt
    assert not torch.equal(gen_only, plain)
    assert not torch.equal(gen_only, everywhere)


def test_window_schedule_stops_pushing_after_n_tokens(tiny_model):
    d = direction(tiny_model, norm=50.0)
    pushes = []
    layer = decoder_layers(tiny_model)[d.layer]
    with steer(tiny_model, d, 1.0, schedule="prompt+first:3"):
        # a probe after the steering hook records how far each step's output moved
        h = layer.register_forward_hook(lambda m, a, o: pushes.append((o[0] if isinstance(o, tuple) else o)[0, -1].clone()))
        try:
            _gen(tiny_model, IDS, n=6)
        finally:
            h.remove()
    h = layer.register_forward_hook(lambda m, a, o: pushes.append((o[0] if isinstance(o, tuple) else o)[0, -1].clone()))
    try:
        _gen(tiny_model, IDS, n=6)
    finally:
        h.remove()
    steered, plain = pushes[:6], pushes[6:]
    # positions: prompt (7 tokens), then generated 7, 8, 9... window covers positions < 7 + 3
    moved = [not torch.allclose(s, p, atol=1e-4) for s, p in zip(steered, plain)]
    assert moved[:3] == [True, True, True]


def test_batched_left_padded_equals_one_at_a_time(tiny_model):
    d = direction(tiny_model, norm=5.0)
    prompts = [[5, 17, 33, 9, 41, 7, 12], [8, 3, 22], [40, 41, 42, 43, 44]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    for schedule in ("all", "generated"):
        with steer(tiny_model, d, 1.0, schedule=schedule):
            batched = _gen(tiny_model, ids, mask)
            single = [_gen(tiny_model, torch.tensor([p]))[0] for p in prompts]
        for row, one in zip(batched, single):
            assert torch.equal(row, one), schedule


def test_several_directions_at_once_add_up(tiny_model):
    a, b = direction(tiny_model, seed=1), direction(tiny_model, seed=2)
    with steer(tiny_model, [(a, 1.0), (b, 0.5)]):
        both = logits(tiny_model)
    total = a.vector * 10.0 + b.vector * 5.0  # reference norm 10: strengths 1.0 and 0.5
    combined = SteeringDirection(total, layer=1, label="a+b")
    with steer(tiny_model, combined, total.norm().item(), unit="raw"):
        summed = logits(tiny_model)
    assert torch.allclose(both, summed, atol=1e-4)


def test_peft_wrapped_model_is_steered():
    from peft import LoraConfig, get_peft_model

    from tests.conftest import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    base = logits(model)
    plain = _gen(model, IDS)
    for schedule in ("all", "generated"):
        with steer(model, direction(model, norm=50.0), 1.0, schedule=schedule):
            assert not torch.equal(plain, _gen(model, IDS)), schedule
    assert torch.equal(base, logits(model))


def test_bad_width_and_layer_fail_before_generation(tiny_model):
    wide = SteeringDirection(torch.ones(65), layer=1, label="wide", reference_norm=1.0)
    with pytest.raises(DirectionError, match="width 65"):
        with steer(tiny_model, wide, 1.0):
            pass
    far = SteeringDirection(torch.ones(64), layer=9, label="far", reference_norm=1.0)
    with pytest.raises(LayerError, match="4 decoder layers"):
        check_direction(tiny_model, far)
    assert all(not layer._forward_hooks for layer in decoder_layers(tiny_model))


def test_strength_units_and_schedule_parsing(tiny_model):
    d = direction(tiny_model, norm=8.0)
    assert d.coefficient(0.5) == 4.0 and d.coefficient(3.0, unit="raw") == 3.0
    with pytest.raises(DirectionError, match="no reference norm"):
        SteeringDirection(torch.ones(64), layer=1, label="n").coefficient(1.0)
    assert Schedule.parse("prompt+first:30") == Schedule("window", 30)
    assert str(Schedule.parse("generated")) == "generated"
    with pytest.raises(ValueError, match="prompt\\+first:N"):
        Schedule.parse("sometimes")


def test_layer_names(tiny_model):
    assert resolve_layer(tiny_model, -1) == 3
    assert resolve_layer(tiny_model, "blocks.2.hook_resid_post") == 2
    assert layer_from_hook_name("blocks.2.hook_resid_pre") == 1
    with pytest.raises(LayerError):
        layer_from_hook_name("blocks.2.attn.hook_z")
    with pytest.raises(LayerError):
        resolve_layer(tiny_model, 4)


def test_direction_round_trips(tmp_path):
    import numpy as np

    d = SteeringDirection(torch.arange(1.0, 9.0), layer=3, label="ocean", source="concept", model_id="m",
                          reference_norm=12.5, metadata={"concept": "ocean"})
    loaded = SteeringDirection.load(d.save(tmp_path / "ocean.safetensors"))
    assert torch.equal(loaded.vector, d.vector) and loaded.layer == 3 and loaded.reference_norm == 12.5
    assert loaded.metadata == {"concept": "ocean"} and abs(loaded.vector.norm().item() - 1) < 1e-6
    torch.save(torch.arange(1.0, 9.0), tmp_path / "v.pt")
    np.save(tmp_path / "v.npy", np.arange(1.0, 9.0))
    for name in ("v.pt", "v.npy"):
        v = load_vector_file(tmp_path / name, layer=2)
        assert v.layer == 2 and torch.allclose(v.vector, d.vector)
    with pytest.raises(DirectionError, match="saved for layer 3"):
        load_vector_file(tmp_path / "ocean.safetensors", layer=2)
    with pytest.raises(DirectionError, match="no such"):
        load_vector_file(tmp_path / "missing.pt", layer=1)
    torch.save(torch.ones(2, 8), tmp_path / "m.pt")
    with pytest.raises(DirectionError, match="1-D"):
        load_vector_file(tmp_path / "m.pt", layer=1)
    with pytest.raises(DirectionError, match="zero"):
        SteeringDirection(torch.zeros(8), layer=0, label="z")


def test_per_row_steering_equals_each_row_steered_alone(tiny_model):
    """steer_rows lets one batch carry a different direction per sequence (eval and
    data_gen mix concepts in a batch); each row must match that row steered alone."""
    from esr_train.steering import steer_rows

    a, b = direction(tiny_model, seed=1, norm=20.0), direction(tiny_model, seed=2, norm=20.0)
    prompts = [[5, 17, 33, 9, 41, 7, 12], [8, 3, 22], [40, 41, 42, 43, 44]]
    rows = [a, None, b]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with steer_rows(tiny_model, rows, [1.0, 1.0, 0.5]):
        batched = _gen(tiny_model, ids, mask)
    for p, d, s, got in zip(prompts, rows, [1.0, 1.0, 0.5], batched):
        if d is None:
            alone = _gen(tiny_model, torch.tensor([p]))[0]
        else:
            with steer(tiny_model, d, s):
                alone = _gen(tiny_model, torch.tensor([p]))[0]
        assert torch.equal(got, alone)
    assert all(not layer._forward_hooks for layer in decoder_layers(tiny_model))


def test_position_mask_limits_the_push_to_chosen_tokens(tiny_model):
    """Training with steer_span=until_answer pushes only the tokens before the answer: the
    layer output moves by the push exactly where the mask is 1, per row, nowhere else."""
    from esr_train.steering import steer_rows

    d = direction(tiny_model, layer=1, norm=4.0)
    ids = torch.tensor([[5, 17, 33, 9, 41], [8, 3, 22, 40, 41]])
    positions = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float)
    seen = []
    layer = decoder_layers(tiny_model)[1]
    probe = lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())
    with torch.no_grad():
        h = layer.register_forward_hook(probe)
        tiny_model(input_ids=ids)
        h.remove()
        with steer_rows(tiny_model, [d, d], 1.0, positions=positions):
            h = layer.register_forward_hook(probe)
            try:
                tiny_model(input_ids=ids)
            finally:
                h.remove()
        with steer_rows(tiny_model, [d, None], 1.0, positions=positions[:, :3]), pytest.raises(ValueError, match="shape"):
            tiny_model(input_ids=ids)
    expected = positions[..., None] * (4.0 * d.vector)
    assert torch.allclose(seen[1] - seen[0], expected, atol=1e-5)


def test_concept_directions_are_shared_across_runs_and_keyed_by_the_weights(tmp_path, monkeypatch):
    """A second run (another save_dir) takes a concept's direction from the cross-run
    cache instead of writing the concept texts again, and copies it into its own run
    directory; changed weights or use_cache=False miss the cache."""
    from esr_train.concepts import direction_file, saved_concept_directions, shared_direction_root, weights_fingerprint
    from esr_train.directions import SteeringDirection
    from esr_train.zoo import load_tokenizer
    from tests.conftest import tiny_llama

    tok = load_tokenizer("smollm2-135m")
    monkeypatch.setenv("ESR_CACHE_DIR", str(tmp_path / "cache"))  # (after the tokenizer: models stay where they are)
    model = tiny_llama(vocab_size=len(tok))
    first = saved_concept_directions(model, tok, ["volcanoes"], 2, tmp_path / "run1")[0]
    shared = direction_file(shared_direction_root(model, tok), "volcanoes", 2)
    assert shared.exists()
    # plant a marker vector in the cache: a second run must return it (a rebuild would not)
    marker = SteeringDirection(vector=torch.ones_like(first.vector), layer=2, label="volcanoes", source="concept")
    marker.save(shared)
    second = saved_concept_directions(model, tok, ["volcanoes"], 2, tmp_path / "run2")[0]
    assert torch.equal(second.vector, marker.vector)
    assert direction_file(tmp_path / "run2", "volcanoes", 2).exists()  # the run keeps what it used
    rebuilt = saved_concept_directions(model, tok, ["volcanoes"], 2, tmp_path / "run3", use_cache=False)[0]
    assert torch.allclose(rebuilt.vector, first.vector, atol=1e-5)

    before = weights_fingerprint(model, tok)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    assert weights_fingerprint(model, tok) != before
    assert not direction_file(shared_direction_root(model, tok), "volcanoes", 2).exists()


def test_weights_fingerprint_sees_an_active_adapter_but_not_a_disabled_one():
    """Evaluation builds directions on the base weights with its adapters disabled: that
    must hit the same cache entry as the plain model; an active adapter must not."""
    from peft import LoraConfig, get_peft_model

    from esr_train.concepts import weights_fingerprint
    from tests.conftest import tiny_llama

    plain = weights_fingerprint(tiny_llama())
    wrapped = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)  # an adapter that changes the outputs
    with wrapped.disable_adapter():
        assert weights_fingerprint(wrapped) == plain
    assert weights_fingerprint(wrapped) != plain


def test_capture_residuals_reads_the_layer_and_stops_there(tiny_model):
    """capture_residuals gives the layer's output (hidden_states[layer + 1]) for each real
    token of a right-padded batch, and no layer after it (nor the head) runs."""
    from esr_train.concepts import capture_residuals
    from tests.test_decoding import CharTokenizer

    tok = CharTokenizer()
    texts = ["hello there", "a longer prompt here", "xyz"]
    layer = 1
    later = []
    hooks = [m.register_forward_hook(lambda *a: later.append(1))
             for m in [*decoder_layers(tiny_model)[layer + 1:], tiny_model.get_output_embeddings()]]
    try:
        got = capture_residuals(tiny_model, tok, texts, layer, batch_size=2)
    finally:
        for h in hooks:
            h.remove()
    assert not later
    for text, acts in zip(texts, got):
        ids = torch.tensor(tok([text])["input_ids"])
        with torch.no_grad():
            want = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0, 1:]
        assert acts.shape == want.shape and torch.allclose(acts, want.float(), atol=1e-5)


def test_a_direction_survives_save_and_load_bit_for_bit(tmp_path):
    """A direction is stored unit-normalised; loading it (and saving the loaded copy again,
    as the cross-run cache does on a hit) must give the very same vector, not one divided
    by its float32 norm once more."""
    from esr_train.directions import SteeringDirection

    g = torch.Generator().manual_seed(0)
    for i in range(20):
        made = SteeringDirection(vector=torch.randn(576, generator=g) * 3, layer=1, label=f"d{i}", source="concept")
        copy = SteeringDirection.load(made.save(tmp_path / "a.safetensors"))
        again = SteeringDirection.load(copy.save(tmp_path / "b.safetensors"))
        assert torch.equal(copy.vector, made.vector) and torch.equal(again.vector, made.vector), i
        assert abs(float(made.vector.norm()) - 1.0) < 1e-6
