"""``esr sae train``: a sae-lens SAE from a model's own residuals, cached, loadable as a
hub SAE's local copy is, and usable as steering directions."""

from __future__ import annotations

import pytest

from esr_train.sae_train import SAESettings, SAETrainError, read_quality, train_sae

TINY = SAESettings(latents=64, k=4, texts=8, max_new_tokens=12, epochs=2, batch_size=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from esr_train.zoo import load_tokenizer
    from tests.conftest import tiny_llama

    tok = load_tokenizer("smollm2-135m")
    return tiny_llama(vocab_size=len(tok)), tok


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return train_sae("tiny-llama", 2, TINY, cache_root=str(cache), model_and_tokenizer=tiny, progress=False), cache


def test_trained_sae_loads_and_gives_directions_at_its_layer(trained, tiny):
    from esr_train.sae import load_sae, sae_direction, sae_layer

    path, _ = trained
    assert {"cfg.json", "sae_weights.safetensors", "quality.json"} <= {p.name for p in path.iterdir()}
    sae = load_sae(path)
    assert sae_layer(sae) == 2 and sae.W_dec.shape == (64, tiny[0].config.hidden_size)
    direction = sae_direction(sae, 5)
    assert direction.layer == 2 and direction.dim == tiny[0].config.hidden_size


def test_quality_is_reported(trained):
    q = read_quality(trained[0])
    assert 0 <= q["dead_fraction"] <= 1 and 0 < q["l0"] <= TINY.k
    assert q["explained_variance"] <= 1 and q["held_out_tokens"] > 0 and q["layer"] == 2
    assert len(q["top_latents"]) == 8 and all("[[" in ex["context"] for ex in q["top_latents"])


def test_a_second_call_is_the_cached_sae(trained, tiny):
    path, cache = trained
    stamp = (path / "sae_weights.safetensors").stat().st_mtime_ns
    again = train_sae("tiny-llama", 2, TINY, cache_root=str(cache), model_and_tokenizer=tiny, progress=False)
    assert again == path and (path / "sae_weights.safetensors").stat().st_mtime_ns == stamp
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())  # nothing half-made left


def test_another_width_reuses_the_written_texts(trained, tiny):
    path, cache = trained
    texts = list(path.parent.parent.glob("texts-*.jsonl"))
    assert len(texts) == 1
    before = texts[0].read_bytes()
    wider = train_sae("tiny-llama", 2, SAESettings(**{**TINY.__dict__, "latents": 96}), cache_root=str(cache),
                      model_and_tokenizer=tiny, progress=False)
    assert wider != path and texts[0].read_bytes() == before
    from esr_train.sae import load_sae

    assert load_sae(wider).W_dec.shape[0] == 96


def test_bad_settings_and_layers_are_one_line_errors(tiny, tmp_path):
    from esr_train.preflight import InputError

    with pytest.raises(SAETrainError, match="--k 65"):
        SAESettings(latents=64, k=65)
    with pytest.raises(InputError, match="--layer 9: out of range"):
        train_sae("tiny-llama", 9, TINY, cache_root=str(tmp_path), model_and_tokenizer=tiny, progress=False)
    assert not (tmp_path / "saes").exists()
