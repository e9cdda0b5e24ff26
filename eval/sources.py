"""Where an evaluation's prompts and steering directions come from.

Defaults keep evaluation honest: the bundled *test* prompts (never trained on) and
concept vectors toward the bundled *test* subjects (never seen in training data). SAE
latents follow the study: the latents most active on the evaluation prompts are dropped
so the steered concept is unrelated to the task. Directions are built with the base
weights (adapters disabled by the caller) and saved in the run directory, so a resumed run
steers with exactly the same vectors.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from eval.config import EvalConfig, EvalConfigError

log = logging.getLogger(__name__)


def _spread(rows: list[dict], n: int, seed: int, group: str) -> list[dict]:
    """``n`` rows, round-robin over ``group`` values after a seeded shuffle, so a small
    sample still covers many domains/categories."""
    rng = random.Random(seed)
    rows = list(rows)
    rng.shuffle(rows)
    buckets: dict[str, list[dict]] = {}
    for r in rows:
        buckets.setdefault(str(r.get(group)), []).append(r)
    out: list[dict] = []
    while len(out) < min(n, len(rows)):
        for bucket in buckets.values():
            if bucket and len(out) < n:
                out.append(bucket.pop())
    return out


def eval_prompts(cfg: EvalConfig) -> list[str]:
    """The bundled test split (or the user's file), ``cfg.n_prompts`` of them."""
    from esr_train.banks import load_prompts

    rows = load_prompts("test", cfg.prompts)
    if not rows:
        raise EvalConfigError(f"eval.prompts: no prompts in {cfg.prompts or 'the bundled test split'}")
    return [r["prompt"] for r in _spread(rows, cfg.n_prompts, cfg.seed, "domain")]


def eval_subjects(cfg: EvalConfig) -> list[str]:
    """The concepts to steer toward: the bundled held-out subjects (or the user's file),
    ``cfg.n_directions`` of them spread over their categories."""
    from esr_train.banks import load_subjects

    rows = load_subjects("test", cfg.concepts)
    if not rows:
        raise EvalConfigError(f"eval.concepts: no subjects in {cfg.concepts or 'the bundled test split'}")
    return [r["subject"] for r in _spread(rows, cfg.n_directions, cfg.seed, "category")]


def _concept_directions(cfg: EvalConfig, model, tok, layer: int, work: Path) -> list:
    from esr_train.concepts import saved_concept_directions

    return saved_concept_directions(model, tok, eval_subjects(cfg), layer, work, batch_size=cfg.batch_size)


def _sae_directions(cfg: EvalConfig, model, tok, prompts: list[str]) -> list:
    from esr_train.concepts import with_reference_norm
    from esr_train.sae import load_sae, most_active_latents, sae_direction

    sae = load_sae(cfg.sae, cfg.sae_id)
    excluded = most_active_latents(sae, model, tok, prompts, k=cfg.exclude_top_k) if cfg.exclude_top_k else set()
    d_sae = int(sae.W_dec.shape[0])
    candidates = [int(i) for i in cfg.latents] if cfg.latents else list(range(d_sae))
    bad = [i for i in candidates if not 0 <= i < d_sae]
    if bad:
        raise EvalConfigError(f"eval.latents: {bad[:5]} out of range for an SAE with {d_sae} latents")
    eligible = [i for i in candidates if i not in excluded]
    if not cfg.latents:
        random.Random(cfg.seed).shuffle(eligible)
    chosen = eligible[: cfg.n_directions]
    if not chosen:
        raise EvalConfigError(f"eval.latents: every candidate is among the {cfg.exclude_top_k} latents most "
                              f"active on the prompts; give others or lower eval.exclude_top_k")
    log.info("SAE latents: %d eligible of %d candidates (%d excluded as active on the prompts)",
             len(eligible), len(candidates), len(excluded))
    labels = {int(k): v for k, v in cfg.latent_labels.items()}
    return [with_reference_norm(sae_direction(sae, i, labels.get(i)), model, tok) for i in chosen]


def _vector_directions(cfg: EvalConfig, model, tok, layer: int) -> list:
    from esr_train.concepts import with_reference_norm
    from esr_train.directions import load_vector_file

    return [with_reference_norm(load_vector_file(p, layer), model, tok) for p in cfg.vectors]


def eval_directions(cfg: EvalConfig, model, tok, layer: int | None, prompts: list[str], work: Path) -> list:
    """Steering directions for the run (unit vectors with their reference norm); ``layer``
    is unused for SAE latents, which live at their SAE's layer."""
    from esr_train.directions import check_direction

    if cfg.directions == "concept":
        directions = _concept_directions(cfg, model, tok, layer, work)
    elif cfg.directions == "sae":
        directions = _sae_directions(cfg, model, tok, prompts)
    else:
        directions = _vector_directions(cfg, model, tok, layer)
    labels = [d.label for d in directions]
    if len(set(labels)) != len(labels):
        raise EvalConfigError(f"eval: two directions share a label ({labels}); labels key the trials")
    for d in directions:
        check_direction(model, d)
    return directions
