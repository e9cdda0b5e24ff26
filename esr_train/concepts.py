"""Concept directions and reference norms, measured on the model's own activations.

A concept vector is the difference of mean layer-L residuals between text about a
concept and neutral task text, both read in the chat context where steering will act
(the answer tokens after a rendered user prompt), excluding the first token (the
attention sink, whose norm dwarfs the rest). The concept text may be given or written by
the model itself, which needs no data and works offline.

Strength is given in units of the layer's *reference norm*: the median residual norm over
non-first tokens of ordinary prose at that layer, so ``strength=0.5`` means half a
typical residual on Llama and Gemma alike.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

import torch

from esr_train.cache import cache_dir
from esr_train.directions import SteeringDirection
from esr_train.decode_residuals import write_and_read
from esr_train.generation import encode, render_prompt
from esr_train.layers import decoder_layers, resolve_layer
from esr_train.zoo import model_name

# Ordinary prose used to measure a layer's typical residual norm. Written for this
# project; any plain text would do, since the median is what matters.
REFERENCE_TEXT = [
    "To keep a kitchen clean, wipe the counters after every meal, wash the dishes before they dry, "
    "and sweep the floor each evening. Once a week, clean the sink and take out the recycling.",
    "A budget starts with a list of what comes in and what goes out each month. Write down fixed costs "
    "such as rent first, then groceries and transport, and set aside a small amount for savings.",
    "When you write an email to a colleague, state the purpose in the first sentence, keep each paragraph "
    "short, and end with the action you need from them and the date you need it by.",
    "To change a flat tyre, loosen the nuts slightly, lift the car with the jack, remove the wheel, fit "
    "the spare, tighten the nuts by hand, lower the car and then tighten them fully in a star pattern.",
]

# Everyday tasks whose answers form the neutral side of a concept vector.
NEUTRAL_PROMPTS = [
    "How do you make a cup of tea?",
    "Explain how to write a polite email asking for a day off.",
    "How do you keep a houseplant healthy?",
    "Explain how to plan a weekly grocery budget.",
    "How do you tie a shoelace?",
    "Explain how to prepare for a job interview.",
    "How do you clean a computer keyboard?",
    "Explain how to convert a fraction to a decimal.",
]

CONCEPT_PROMPTS = [
    "Write a short paragraph about {concept}.",
    "Tell me some interesting facts about {concept}.",
    "Describe {concept} in detail.",
]

DIRECTION_RECIPE = 2
"""Bump when the way a self-written concept direction is built changes: it is part of the
key of the cross-run direction cache, so old entries stop matching."""

_NORM_CACHE: dict[tuple, float] = {}
_NEUTRAL_CACHE: dict[tuple, torch.Tensor] = {}


class _LayerReached(Exception):
    """Raised by :func:`capture_residuals`' hook once the layer it reads has run."""


@torch.inference_mode()
def capture_residuals(model, tokenizer, texts: Sequence[str], layer: int, starts: Sequence[int] | None = None,
                      batch_size: int = 8) -> list[torch.Tensor]:
    """Layer-``layer`` residual outputs for each already-rendered text, as [n_i, d]
    float32 tensors over the token positions from ``starts[i]`` on (default 1: skip the
    first token). Right padding, so real tokens keep positions 0..n-1.

    The forward pass stops once ``layer`` has run: nothing after it can change its output,
    and the later layers plus the LM head over every position (49k words for SmolLM2, 262k
    for Gemma 3) were most of the cost of building a concept direction."""
    layer = resolve_layer(model, layer)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def read_and_stop(module, args, out):
        captured.append((out[0] if isinstance(out, tuple) else out).detach().float().cpu())
        raise _LayerReached

    handle = decoder_layers(model)[layer].register_forward_hook(read_and_stop)
    results: list[torch.Tensor] = []
    try:
        for i in range(0, len(texts), batch_size):
            chunk = list(texts[i:i + batch_size])
            enc = encode(tokenizer, chunk, "right", device)
            captured.clear()
            try:
                model(**enc, use_cache=False)
            except _LayerReached:
                pass
            hidden = captured[0]
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            for row, n in enumerate(lengths):
                start = 1 if starts is None else max(1, starts[i + row])
                results.append(hidden[row, start:int(n)])
    finally:
        handle.remove()
    return results


def reference_norm(model, tokenizer, layer: int) -> float:
    """Median residual norm at ``layer`` over non-first tokens of ordinary prose."""
    layer = resolve_layer(model, layer)
    key = (model_name(model), layer, str(next(model.parameters()).dtype))
    if key not in _NORM_CACHE:
        texts = [(tokenizer.bos_token or "") + t if _adds_bos(tokenizer) else t for t in REFERENCE_TEXT]
        acts = torch.cat(capture_residuals(model, tokenizer, texts, layer))
        _NORM_CACHE[key] = float(acts.norm(dim=-1).median())
    return _NORM_CACHE[key]


def _adds_bos(tokenizer) -> bool:
    """Whether the model's chat template starts with BOS (Gemma) so reference text should too."""
    rendered = render_prompt(tokenizer, "x")
    return bool(tokenizer.bos_token) and rendered.startswith(tokenizer.bos_token)


def with_reference_norm(direction: SteeringDirection, model, tokenizer) -> SteeringDirection:
    return direction.with_reference_norm(reference_norm(model, tokenizer, direction.layer))


def answer_residual_mean(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], layer: int) -> torch.Tensor:
    """Mean layer residual over the answer tokens of (prompt, answer) chats."""
    heads = [render_prompt(tokenizer, p) for p in prompts]
    starts = [len(tokenizer(h, add_special_tokens=False)["input_ids"]) for h in heads]
    texts = [h + a for h, a in zip(heads, answers)]
    acts = [a for a in capture_residuals(model, tokenizer, texts, layer, starts=starts) if len(a)]
    if not acts:
        raise ValueError("no answer tokens to average: every answer was empty")
    return torch.cat(acts).mean(dim=0)


def neutral_mean(model, tokenizer, layer: int, max_new_tokens: int = 80) -> torch.Tensor:
    """Mean residual over the model's own answers to everyday tasks (cached per model/layer)."""
    key = _neutral_key(model, layer, max_new_tokens)
    if key not in _NEUTRAL_CACHE:
        _, total, count = write_and_read(model, tokenizer, NEUTRAL_PROMPTS, layer, max_new_tokens=max_new_tokens,
                                         repetition_penalty=1.1)
        _NEUTRAL_CACHE[key] = _pooled_mean(total, count, "neutral answers")
    return _NEUTRAL_CACHE[key]


def _neutral_key(model, layer: int, max_new_tokens: int) -> tuple:
    return (model_name(model), resolve_layer(model, layer), max_new_tokens, str(next(model.parameters()).dtype))


def _pooled_mean(total: torch.Tensor, count: torch.Tensor, what: str) -> torch.Tensor:
    """The mean over every token of several answers, from per-answer sums and counts."""
    if float(count.sum()) == 0:
        raise ValueError(f"no answer tokens to average: every one of the {what} was empty")
    return total.sum(dim=0) / count.sum()


def concept_direction(
    model,
    tokenizer,
    concept: str,
    layer: int,
    concept_texts: Sequence[str] | None = None,
    max_new_tokens: int = 80,
    label: str | None = None,
) -> SteeringDirection:
    """A unit direction toward ``concept`` at ``layer``, with the layer's reference norm.

    Without ``concept_texts`` the model writes them itself (greedy answers to a few
    requests about the concept)."""
    texts = None if concept_texts is None else {concept: list(concept_texts)}
    return concept_directions(model, tokenizer, [concept], layer, texts, max_new_tokens, labels=[label or concept])[0]


def concept_directions(
    model,
    tokenizer,
    concepts: Sequence[str],
    layer: int,
    concept_texts: dict[str, Sequence[str]] | None = None,
    max_new_tokens: int = 80,
    labels: Sequence[str] | None = None,
    batch_size: int = 16,
) -> list[SteeringDirection]:
    """Directions for many concepts at once: the self-written concept texts of all
    concepts are generated in shared batches (one concept at a time would run batches of
    three)."""
    layer = resolve_layer(model, layer)
    given = concept_texts or {}
    asks = [(c, p.format(concept=c)) for c in concepts if c not in given for p in CONCEPT_PROMPTS]
    # the neutral answers, when not yet known, share the concept texts' batches (alone they
    # would run eight rows at a time)
    neutral_key = _neutral_key(model, layer, max_new_tokens)
    neutral = [] if neutral_key in _NEUTRAL_CACHE or not asks else NEUTRAL_PROMPTS
    _, total, count = write_and_read(model, tokenizer, [a for _, a in asks] + neutral, layer,
                                     max_new_tokens=max_new_tokens, repetition_penalty=1.1, batch_size=batch_size,
                                     progress="concept texts" if len(asks) > batch_size else False)
    if neutral:
        _NEUTRAL_CACHE[neutral_key] = _pooled_mean(total[len(asks):], count[len(asks):], "neutral answers")
    toward: dict[str, tuple[torch.Tensor, int, str]] = {}
    for c in dict.fromkeys(c for c, _ in asks):
        rows = [i for i, (owner, _) in enumerate(asks) if owner == c]
        toward[c] = (_pooled_mean(total[rows], count[rows], f"texts about {c!r}"), len(rows), "self")
    for c, texts in given.items():
        texts = list(texts)
        prompts = [CONCEPT_PROMPTS[i % len(CONCEPT_PROMPTS)].format(concept=c) for i in range(len(texts))]
        toward[c] = (answer_residual_mean(model, tokenizer, prompts, texts, layer), len(texts), "given")
    away = neutral_mean(model, tokenizer, layer, max_new_tokens)
    norm = reference_norm(model, tokenizer, layer)
    out = []
    for i, c in enumerate(concepts):
        mean, n_texts, source = toward[c]
        out.append(SteeringDirection(
            vector=mean - away, layer=layer, label=(labels[i] if labels else c), source="concept",
            model_id=model_name(model), reference_norm=norm,
            metadata={"concept": c, "texts": source, "n_texts": n_texts},
        ))
    return out


def direction_file(root: Path, concept: str, layer: int) -> Path:
    """Where a concept's direction at ``layer`` is saved under ``root``."""
    slug = re.sub(r"[^a-z0-9]+", "-", concept.lower()).strip("-")[:60] or "subject"
    return Path(root) / f"{slug}-L{layer}.safetensors"


def weights_fingerprint(model, tokenizer=None) -> str:
    """A cheap identity of a model's current weights (and tokenizer): every parameter's
    name, shape, dtype and 256 strided samples. Two models with the same fingerprint write
    the same concept texts, so their directions can be shared across runs; a fine-tuned,
    re-quantised or re-initialised model does not match."""
    h = hashlib.sha1(model_name(model).encode())
    silent = _silent_adapter_params(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in silent:
                continue
            flat = p.detach().reshape(-1)
            # a PEFT wrapper renames the base weights; with its adapters off it is the base model
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            if flat.numel():
                h.update(flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    if tokenizer is not None:
        h.update(f"{len(tokenizer)}{getattr(tokenizer, 'chat_template', '')}".encode())
    return h.hexdigest()[:16]


def _silent_adapter_params(model) -> set[str]:
    """Names of PEFT adapter parameters that do not act in the current forward pass
    (adapters disabled, as evaluation does to build directions on the base weights, or
    not the active one), so they do not change the fingerprint."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    silent: set[str] = set()
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, BaseTunerLayer):
            continue
        active = set() if mod.disable_adapters else set(mod.active_adapters)
        for layer_name in mod.adapter_layer_names:
            for adapter, sub in getattr(mod, layer_name).items():
                if adapter in active:
                    continue
                prefix = f"{mod_name}.{layer_name}.{adapter}"
                if isinstance(sub, torch.nn.Parameter):
                    silent.add(prefix)
                else:
                    silent.update(f"{prefix}.{n}" for n, _ in sub.named_parameters())
    return silent


def shared_direction_root(model, tokenizer, max_new_tokens: int = 80) -> Path:
    """Where self-written concept directions of this model are kept across runs: keyed by
    the weights, the tokenizer and everything that decides the concept and neutral texts
    (their prompts, length, the reference prose), so a hit is the direction this run would
    build (up to the padding of the batches it was written in)."""
    settings = {"recipe": DIRECTION_RECIPE, "weights": weights_fingerprint(model, tokenizer),
                "max_new_tokens": max_new_tokens, "concept_prompts": CONCEPT_PROMPTS,
                "neutral_prompts": NEUTRAL_PROMPTS, "reference_text": REFERENCE_TEXT}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^a-z0-9]+", "-", model_name(model).lower()).strip("-")[-40:] or "model"
    return cache_dir() / "directions" / f"{slug}-{key}"


def saved_concept_directions(
    model,
    tokenizer,
    concepts: Sequence[str],
    layer: int,
    save_dir: Path,
    search: Sequence[Path] = (),
    batch_size: int = 16,
    use_cache: bool = True,
) -> list[SteeringDirection]:
    """Each concept's direction, loaded where it was saved before (``save_dir`` first,
    then ``search``), the missing ones built in shared batches and saved to ``save_dir``:
    data generation, training and evaluation steer with the very same vectors.

    With ``use_cache`` the cross-run cache (:func:`shared_direction_root`) is looked up
    before building and filled after: writing the subjects' concept texts is a large share of
    a dataset's generation time (measured in docs/performance.md), and the same work in every
    run. A hit is
    copied into ``save_dir``, so a run directory always holds the vectors it used."""
    concepts = list(dict.fromkeys(concepts))
    save_dir = Path(save_dir)
    roots = [save_dir, *map(Path, search)]

    def found(c: str) -> Path | None:
        return next((p for p in (direction_file(r, c, layer) for r in roots) if p.exists()), None)

    missing = [c for c in concepts if found(c) is None]
    shared = shared_direction_root(model, tokenizer) if use_cache and missing else None
    if shared is not None:
        for c in missing:
            if direction_file(shared, c, layer).exists():
                SteeringDirection.load(direction_file(shared, c, layer)).save(direction_file(save_dir, c, layer))
        missing = [c for c in missing if found(c) is None]
    if missing:
        for c, d in zip(missing, concept_directions(model, tokenizer, missing, layer, batch_size=batch_size)):
            d.save(direction_file(save_dir, c, layer))
            if shared is not None:
                d.save(direction_file(shared, c, layer))
    return [SteeringDirection.load(found(c)) for c in concepts]
