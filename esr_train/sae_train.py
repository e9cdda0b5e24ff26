"""Train a sparse autoencoder on a model's own residual stream, offline, with sae-lens.

Hub SAEs (Gemma Scope, Llama Scope) exist for hub models; the bundled CPU models have none,
and nothing may be downloaded at run time. :func:`train_sae` builds one from text the model
writes itself: its answers to the bundled training prompts, and short texts it writes about
the bundled training subjects (so the SAE has latents for the concepts a steering push is
made of). Each text is read in the chat template, and the residuals after decoder layer
``layer`` over every token but the first are the training data.

The SAE is sae-lens's TopK architecture (``TopKTrainingSAE``), trained with sae-lens's
``SAETrainer`` on those activations, and saved as an inference SAE (``cfg.json`` +
``sae_weights.safetensors``, hook ``blocks.{layer}.hook_resid_post``), so it loads as a hub
SAE's local copy does: ``esr_train.sae.load_sae(DIR)``, ``esr eval --eval.directions sae
--eval.sae DIR``. Its quality on held-out texts (explained variance, L0, dead latents, the
top-activating text of a few latents) is written beside it in ``quality.json``.

Cache: ``<cache>/saes/<model>/layer<L>/<key>``, where the key covers the model's weights, the
layer and every setting, so a second call with the same arguments returns at once. The
written texts are stored as they finish in ``<cache>/saes/<model>/texts-<key>.jsonl`` (a
killed run resumes them; SAEs of other widths or layers reuse them), and the finished SAE is
moved into place in one rename, so a half-written SAE never exists under the key.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from esr_train.errors import EsrError

SUBJECT_REQUEST = "Write a few sentences about {subject}."


class SAETrainError(EsrError, ValueError):
    """Settings or a model an SAE cannot be trained for."""


@dataclass(frozen=True)
class SAESettings:
    latents: int = field(default=2048, metadata={"help": "SAE width (d_sae)"})
    k: int = field(default=32, metadata={"help": "active latents per token (TopK)"})
    texts: int = field(default=720, metadata={"help": "texts the model writes: half answers to bundled prompts, "
                                                      "half about bundled subjects"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per written text"})
    epochs: int = field(default=8, metadata={"help": "passes over the training activations"})
    batch_size: int = field(default=1024, metadata={"help": "activations per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "Adam learning rate"})
    held_out: float = field(default=0.1, metadata={"help": "share of the texts kept out of training for quality"})
    normalize: str = field(default="expected_average_only_in", metadata={
        "help": "input scaling while training (sae-lens): expected_average_only_in (to norm sqrt(d_in)) or "
                "covariance_whitening (for residuals with a few huge dimensions); folded into the saved weights"})
    seed: int = field(default=0, metadata={"help": "seed of the text order, the sampling and the SAE init"})

    def __post_init__(self) -> None:
        checks = [("latents", self.latents >= 2), ("k", 1 <= self.k <= self.latents), ("texts", self.texts >= 4),
                  ("max_new_tokens", self.max_new_tokens >= 1), ("epochs", self.epochs >= 1),
                  ("batch_size", self.batch_size >= 1), ("lr", self.lr > 0), ("held_out", 0 < self.held_out < 1),
                  ("normalize", self.normalize in ("expected_average_only_in", "covariance_whitening"))]
        for name, ok in checks:
            if not ok:
                raise SAETrainError(f"--{name.replace('_', '-')} {getattr(self, name)}: out of range")


def sae_cache_dir(model_name: str, layer: int, key: str, cache_root: str | None = None) -> Path:
    from esr_train.cache import cache_dir

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    return cache_dir(cache_root) / "saes" / safe / f"layer{layer}" / key


def _written_texts(model, tok, settings: SAESettings, store_path: Path, progress: bool) -> list[str]:
    """The chat-rendered texts (request + the model's answer), written once and stored in
    ``store_path`` as they finish, so a killed run keeps what it wrote and SAEs of other
    widths on the same texts reuse them. Each text is sampled from a seed fixed by its
    request, so a resumed run writes what the first would have."""
    from esr_train.banks import load_prompts, load_subjects
    from esr_train.generation import iter_generate, render_prompt, seed_from
    from esr_train.records import JsonlStore

    rng = random.Random(settings.seed)
    prompts = [r["prompt"] for r in load_prompts("train")]
    subjects = [r["subject"] for r in load_subjects("train")]
    rng.shuffle(prompts)
    rng.shuffle(subjects)
    n_subject = settings.texts // 2
    requests = [prompts[i % len(prompts)] for i in range(settings.texts - n_subject)]
    requests += [SUBJECT_REQUEST.format(subject=subjects[i % len(subjects)]) for i in range(n_subject)]
    keys = [f"{i}|{r}" for i, r in enumerate(requests)]
    store = JsonlStore(store_path)
    todo = [i for i, key in enumerate(keys) if key not in store]
    if todo:
        for j, answer in iter_generate(model, tok, [requests[i] for i in todo], max_new_tokens=settings.max_new_tokens,
                                       do_sample=True, temperature=0.7, repetition_penalty=1.1, batch_size=64,
                                       seeds=[seed_from(settings.seed, keys[i]) for i in todo],
                                       progress="sae texts" if progress else False):
            store.put(keys[todo[j]], answer)
    return [render_prompt(tok, request) + store[key] for request, key in zip(requests, keys)]


def _batches(acts: torch.Tensor, batch_size: int, epochs: int, seed: int):
    """Shuffled batches of rows of ``acts``, ``epochs`` passes."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(acts.shape[0], generator=g)
        for i in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[order[i:i + batch_size]]


def _quality(sae, acts: torch.Tensor, texts_tokens: list[list[str]], offsets: list[int], top: int = 8) -> dict:
    """Explained variance, L0 and dead latents on held-out activations; the latents active on
    0.1-5% of tokens (``specific_latents``: specific enough to read, and alive, the candidates
    to steer with); the top-activating token context of ``top`` latents: the most strongly
    activated specific ones, else the most frequent."""
    with torch.no_grad():
        feats = sae.encode(acts)
        recon = sae.decode(feats)
    resid = ((acts - recon) ** 2).sum()
    total = ((acts - acts.mean(dim=0)) ** 2).sum()
    active = feats > 0
    fired = active.any(dim=0)
    frequency = active.float().mean(dim=0)
    examples = []
    peak = feats.max(dim=0).values
    specific = ((frequency >= 0.001) & (frequency <= 0.05)).nonzero().flatten()
    pool = specific[torch.argsort(peak[specific], descending=True)] if len(specific) >= top else \
        torch.argsort(frequency, descending=True)
    for latent in pool[:top].tolist():
        best = int(torch.argmax(feats[:, latent]))
        text = next(t for t in range(len(offsets)) if offsets[t] <= best < offsets[t] + len(texts_tokens[t]))
        words, pos = texts_tokens[text], best - offsets[text]
        before, after = "".join(words[max(0, pos - 8):pos]), "".join(words[pos + 1:pos + 3])
        examples.append({"latent": latent, "frequency": round(float(frequency[latent]), 4),
                         "max_activation": round(float(feats[best, latent]), 3),
                         "context": f"{before}[[{words[pos]}]]{after}"})
    return {"specific_latents": specific.tolist(),
            "explained_variance": round(float(1 - resid / total), 4),
            "l0": round(float(active.sum(dim=1).float().mean()), 2),
            "dead_fraction": round(float(1 - fired.float().mean()), 4),
            "held_out_tokens": int(acts.shape[0]), "top_latents": examples}


def train_sae(model_name: str, layer: int, settings: SAESettings = SAESettings(), *, cache_root: str | None = None,
              model_and_tokenizer=None, progress: bool = True) -> Path:
    """The directory of a sae-lens SAE trained on ``model_name``'s layer-``layer`` residuals
    (trained now, or found in the cache); see the module docstring."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    from esr_train.cache import atomic_directory, atomic_write_json
    from esr_train.concepts import capture_residuals, weights_fingerprint
    from esr_train.layers import hidden_size, num_layers
    from esr_train.preflight import check_layer, model_shape
    from esr_train.zoo import load_model

    if model_and_tokenizer is None:  # the layer is checked from the config, before the weights load
        shape = model_shape(model_name)
        if shape is not None:
            check_layer(layer, shape[0], "--layer")
    model, tok = model_and_tokenizer or load_model(model_name)
    check_layer(layer, num_layers(model), "--layer")
    weights = weights_fingerprint(model, tok)
    key = hashlib.sha256(json.dumps({"weights": weights, "layer": layer, "settings": asdict(settings)},
                                    sort_keys=True).encode()).hexdigest()[:16]
    final = sae_cache_dir(model_name, layer, key, cache_root)
    if (final / "cfg.json").exists() and (final / "quality.json").exists():
        return final
    text_key = hashlib.sha256(json.dumps([weights, settings.texts, settings.max_new_tokens, settings.seed]
                                         ).encode()).hexdigest()[:16]
    texts = _written_texts(model, tok, settings, final.parent.parent / f"texts-{text_key}.jsonl", progress)
    n_held = max(1, round(len(texts) * settings.held_out))
    train_texts, held_texts = texts[n_held:], texts[:n_held]
    acts = torch.cat(capture_residuals(model, tok, train_texts, layer))
    held = capture_residuals(model, tok, held_texts, layer)
    if acts.shape[0] < settings.batch_size:
        raise SAETrainError(f"only {acts.shape[0]} training activations for a batch of {settings.batch_size}; "
                            "write more texts (--texts) or use a smaller --batch-size")

    torch.manual_seed(settings.seed)
    # inputs scaled to norm sqrt(d_in) while training (the scale is folded into the saved weights)
    cfg = TopKTrainingSAEConfig(d_in=hidden_size(model), d_sae=settings.latents, k=settings.k, dtype="float32",
                                device="cpu", normalize_activations=settings.normalize, metadata=SAEMetadata(model_name=model_name,
                                                                   hook_name=f"blocks.{layer}.hook_resid_post"))
    sae = TopKTrainingSAE(cfg)
    steps = (acts.shape[0] // settings.batch_size) * settings.epochs
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * settings.batch_size,
                                   train_batch_size_samples=settings.batch_size, lr=settings.lr, lr_end=settings.lr,
                                   device="cpu",
                                   lr_warm_up_steps=min(100, steps // 10), dead_feature_window=max(1, steps // 4),
                                   feature_sampling_window=max(1, steps // 2), n_checkpoints=0,
                                   logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=10)
    trainer = SAETrainer(trainer_cfg, sae, _batches(acts, settings.batch_size, settings.epochs + 1, settings.seed))
    trained = trainer.fit()

    from sae_lens import SAE

    with atomic_directory(final) as tmp:
        trained.save_inference_model(tmp)
        inference = SAE.load_from_disk(str(tmp), device="cpu")
        tokens = [tok.convert_ids_to_tokens(tok(t, add_special_tokens=False)["input_ids"])[1:] for t in held_texts]
        tokens = [[tok.convert_tokens_to_string([w]) for w in ws] for ws in tokens]
        lengths = [h.shape[0] for h in held]
        tokens = [ws[:n] + [""] * (n - len(ws)) for ws, n in zip(tokens, lengths)]
        offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        quality = _quality(inference, torch.cat(held), tokens, offsets)
        atomic_write_json(tmp / "quality.json", {**quality, "model": model_name, "layer": layer,
                                                 "training_tokens": int(acts.shape[0]), "steps": steps,
                                                 "texts": len(texts), "settings": asdict(settings)})
    return final


def read_quality(sae_dir: str | Path) -> dict[str, Any]:
    from esr_train.cache import read_json

    return read_json(Path(sae_dir) / "quality.json", default={}) or {}
