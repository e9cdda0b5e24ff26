"""Chat rendering and batched generation shared by the CLI, data_gen and eval.

Prompts are rendered with the model's own chat template (user turn, optional system
turn) and tokenized *without* extra special tokens, since the templates already hold
BOS. Batches are left-padded and sorted by length so padding stays small.

``generate`` decodes with ``esr_train.decoding`` by default: finished rows leave the
batch and waiting prompts take their slots. ``engine="hf"`` runs ``model.generate`` on
fixed batches instead (the reference the decode loop is tested against).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm


def render_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The chat-formatted text that precedes the assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, texts: Sequence[str], padding_side: str = "left", device=None) -> dict:
    """Tokenize already-rendered texts as one padded batch."""
    old = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old
    return {k: v.to(device) for k, v in enc.items()} if device is not None else dict(enc)


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], *, engine: str = "decode", **options) -> list[str]:
    """Answer each prompt; returns the decoded new text in the input order.

    ``options`` are the keywords of :func:`iter_generate` (``max_new_tokens``, ``do_sample``,
    ``temperature``, ``top_p``, ``repetition_penalty``, ``batch_size``, ``seed``, ``seeds``,
    ``system``, ``rendered``, ``progress``, ``row_steering``, ``strength``, ``schedule``,
    ``refill``), with its defaults; an unknown one is a TypeError. ``engine``: ``"decode"``
    (:func:`iter_generate`: finished rows leave, waiting prompts refill the batch) or ``"hf"``
    (``model.generate`` per fixed batch; ``seed`` then seeds the global RNG per batch, so the
    two engines draw differently, and ``seeds`` and ``refill`` do not apply).
    """
    import inspect

    if engine not in ("decode", "hf"):
        raise ValueError(f"unknown generate engine {engine!r}; valid: decode, hf")
    bound = inspect.signature(iter_generate).bind(model, tokenizer, prompts, **options)
    bound.apply_defaults()
    o = bound.arguments
    if engine == "decode":
        outputs = [""] * len(prompts)
        for i, text in iter_generate(**o):
            outputs[i] = text
        return outputs
    if o["seeds"] is not None:
        raise ValueError("per-prompt seeds need the decode engine")
    return _hf_generate(model, tokenizer, o)


def _hf_generate(model, tokenizer, o: dict) -> list[str]:
    """``generate``'s ``"hf"`` engine with :func:`iter_generate`'s bound arguments ``o``."""
    from contextlib import nullcontext

    from esr_train.steering import steer_rows

    texts, strengths = _chat_texts(tokenizer, o["prompts"], o["system"], o["rendered"], o["row_steering"],
                                   o["strength"])
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    outputs: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=o["max_new_tokens"], do_sample=o["do_sample"],
                  repetition_penalty=o["repetition_penalty"], pad_token_id=tokenizer.pad_token_id)
    if o["do_sample"]:
        kwargs["temperature"] = o["temperature"]
        if o["top_p"] is not None:
            kwargs["top_p"] = o["top_p"]
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    batch_size, seed, steering = o["batch_size"], o["seed"], o["row_steering"]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for b, idx in enumerate(tqdm(batches, desc=_label(o["progress"]), disable=not o["progress"], unit="batch")):
        if seed is not None:
            torch.manual_seed(seed + b)
        enc = encode(tokenizer, [texts[i] for i in idx], "left", device)
        ctx = nullcontext() if steering is None else steer_rows(
            model, [steering[i] for i in idx], [strengths[i] for i in idx], schedule=o["schedule"])
        with ctx:
            out = model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
    return outputs


def _chat_texts(tokenizer, prompts, system, rendered, row_steering, strength) -> tuple[list[str], list[float]]:
    """The texts the model reads (chat-rendered unless ``rendered``) and one strength per
    prompt; a ``row_steering`` of the wrong length is an error before anything runs."""
    if row_steering is not None and len(row_steering) != len(prompts):
        raise ValueError(f"row_steering has {len(row_steering)} entries for {len(prompts)} prompts")
    strengths = [float(strength)] * len(prompts) if isinstance(strength, (int, float)) else list(strength)
    texts = list(prompts) if rendered else [render_prompt(tokenizer, p, system) for p in prompts]
    return texts, strengths


def seed_from(*parts) -> int:
    """A 63-bit sampling seed fixed by ``parts`` alone (their text), the same on every run and
    machine: the seed of one row keyed by what the row is, never by where it sits in a batch."""
    import hashlib

    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def _label(progress: "bool | str") -> str:
    """The progress bar's label: ``progress`` itself when it is one, else "generate"."""
    return progress if isinstance(progress, str) else "generate"


def iter_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.6,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    batch_size: int = 16,
    seed: int | None = None,
    system: str | None = None,
    rendered: bool = False,
    progress: "bool | str" = False,
    row_steering: "Sequence | None" = None,
    strength: "float | Sequence[float]" = 0.0,
    schedule: str = "all",
    refill: bool = True,
    seeds: "Sequence[int] | None" = None,
) -> Iterator[tuple[int, str]]:
    """Answer each prompt on the decode loop, one answer at a time: yields ``(index into
    prompts, text)`` as each row finishes, so a caller can store every answer the moment
    it exists (a killed run loses only the rows still in the batch) while all prompts share
    one refilling batch (a batch that drains to empty before the next chunk starts runs
    its last steps with a few rows). :func:`generate` collects it in order.

    ``rendered=True`` takes prompts that are already chat-formatted (or raw text for a
    base-model continuation); otherwise each is rendered with the chat template and
    ``system``. ``row_steering`` gives each prompt its own direction (or None), applied with
    ``strength`` (one value or one per prompt) and ``schedule``; batches stay mixed.
    ``seed`` seeds one generator for the whole run; ``seeds`` (one per prompt) gives each
    prompt its own instead, so an answer's draws depend on its seed alone, not on its batch
    or position. ``refill=False`` only drops finished rows and starts the next group when
    the batch is empty.

    Prompts enter longest first (in tokens), so a row that takes a freed slot never
    widens the batch; sampling settings the model's own generation_config adds (top_k, a
    default top_p) apply as they do in ``model.generate``."""
    from contextlib import nullcontext

    from esr_train.decoding import Sampling, stream_decode
    from esr_train.steering import steer_rows

    texts, strengths = _chat_texts(tokenizer, prompts, system, rendered, row_steering, strength)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    config = getattr(model, "generation_config", None)
    sampling = Sampling(do_sample=do_sample, repetition_penalty=repetition_penalty,
                        temperature=temperature if do_sample else None,
                        top_p=(top_p if top_p is not None else getattr(config, "top_p", None)) if do_sample else None,
                        top_k=getattr(config, "top_k", None) if do_sample else None)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None and do_sample else None
    ctx = nullcontext() if row_steering is None else steer_rows(
        model, [row_steering[i] for i in order], [strengths[i] for i in order], schedule=schedule)
    # The steering hooks stay on the model until the iterator ends or is closed; inference
    # mode is entered only while the loop runs, never while the caller holds a yielded answer.
    with ctx as selection, tqdm(total=len(texts), desc=_label(progress), disable=not progress, unit="prompt") as bar:
        rows = stream_decode(model, [ids[i] for i in order], max_new_tokens=max_new_tokens, sampling=sampling,
                             batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, generator=generator,
                             steering=selection, refill=refill,
                             row_seeds=None if seeds is None or not do_sample else [seeds[i] for i in order])
        while True:
            with torch.inference_mode():
                finished = next(rows, None)
            if finished is None:
                return
            k, tokens = finished
            bar.update(1)
            yield order[k], tokenizer.decode(tokens, skip_special_tokens=True).strip()
