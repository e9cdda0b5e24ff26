"""Rows -> masked token sequences for SFT, built from the row's structured parts.

The sequence is the chat template's rendering of [user prompt, assistant turn] up to and
including the end-of-turn token, assembled segment by segment so the loss mask falls
exactly on part boundaries instead of being recovered from text offsets:

    render_prompt(prompt)  distraction  " " restart  " " answer  <end-of-turn>
    [-100 .........................]    [trained ......................... ]

The model sees the distraction as context but is never taught to produce it; it learns to
restart, answer, and stop on the template's end-of-turn token (Gemma: ``<end_of_turn>``,
not ``<eos>``, which the chat template never emits after a turn). The template's trailing
newline after the end token is dropped: nothing is generated after the stop token, so
training it would only teach a token that is never sampled.

Each segment is tokenized on its own with ``add_special_tokens=False`` (the rendered
prompt already holds BOS where the model has one); the separating space starts the
following segment, as in ``Transcript.assistant_text``. For SmolLM2 and Gemma 3 the ids
equal a one-shot tokenization of the full rendering (tested), because both tokenizers
attach a leading space to the following word.

Rows longer than ``max_length`` are dropped, never truncated: truncating would cut off the
restart, the one thing the adapter must learn.

TRL 1.16 (``SFTTrainer._prepare_dataset``) treats a dataset with an ``input_ids`` column as
pre-tokenized and uses a ``labels`` column as is; ``DataCollatorForLanguageModeling`` pads
``labels`` with -100 and builds its own attention mask (the dataset's ``attention_mask`` is
removed as an unused column). TRL still truncates to ``SFTConfig.max_length`` (default
1024), so set it to ``None`` or at least the ``max_length`` used here.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from esr_train.generation import render_prompt
from esr_train.rows import FALSE_RESTART, UNLIKELY_COLUMN

if TYPE_CHECKING:
    import datasets

IGNORE = -100
_MARKER = "ESR_END_OF_TURN_PROBE"
_FORMAT = 3  # bump when the sequence layout changes, so cached maps are not reused


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no BOS/EOS added (templates carry their own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token(s) the chat template puts right after an assistant message's text.

    Found by rendering a one-turn chat with a known assistant text and tokenizing what
    follows it, minus trailing whitespace (the newline between turns is never generated).
    Falls back to the tokenizer's EOS when the template adds nothing after the text.
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARKER}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    at = rendered.rfind(_MARKER)
    if at < 0:
        raise ValueError("the chat template did not render the assistant message")
    ids = _encode(tokenizer, rendered[at + len(_MARKER):].rstrip())
    if not ids:
        if tokenizer.eos_token_id is None:
            raise ValueError("the chat template closes no turn and the tokenizer has no EOS")
        ids = [tokenizer.eos_token_id]
    return ids


def _check_no_added_bos(tokenizer, text: str, ids: list[int]) -> None:
    """BOS appears only where the text spells it (the template's own), so never doubled."""
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if bos and bos_id is not None and ids.count(bos_id) != text.count(bos):
        raise AssertionError(f"tokenization added a BOS token ({ids.count(bos_id)} in ids, {text.count(bos)} in text)")


def tokenize_row(
    row: dict[str, Any],
    tokenizer,
    max_length: int,
    system: str | None = None,
    eot: list[int] | None = None,
    answer_tokens: int | None = None,
    normal_tokens: int | None = None,
    normal_skip: int = 0,
    unlikely_tokens: int | None = None,
) -> dict[str, Any] | None:
    """One row -> {"input_ids", "attention_mask", "labels", "n_loss_tokens", "answer_start"},
    or None when the row is longer than ``max_length`` or would train on nothing.
    ``answer_start`` is the position of the answer's first token (after the restart; the
    start of the assistant text for normal rows).

    ``eot`` (from ``end_of_turn_ids``) may be passed to skip re-probing the template.
    ``answer_tokens=N`` trains only the restart and the answer's first N tokens (normal
    rows: the first N, or ``normal_tokens`` when given); the sequence ends there, since later
    tokens cannot change the loss of earlier ones. Adapters trained on whole answers resisted
    the push instead of drifting and restarting (see docs/results.md). ``normal_skip=K``
    keeps a normal row's first K answer tokens in the context but out of the loss, to test
    whether reinforcing the opener that restates the question is what anchors the adapters'
    steered answers (it made no difference beyond seed noise; see docs/results.md). ``unlikely_tokens=M``
    makes only a false restart's first M tokens unlikely and ends the row there: the first
    token is where the model decides to restart, while the later ones, given that start, are
    the very tokens the self-correction rows train as likely.
    """
    kind = row.get("kind") or "normal"
    negative = kind == FALSE_RESTART
    answer = (row.get("answer") or "").strip()
    if kind == "self_correction":
        distraction, restart = (row.get("distraction") or "").strip(), (row.get("restart") or "").strip()
        if not distraction or not restart:
            raise ValueError("self_correction row needs a distraction and a restart")
        masked_text, trained_texts = distraction, [" " + restart, " " + answer if answer else ""]
    elif kind == "normal":
        masked_text, trained_texts = "", ["", answer]
    elif kind == FALSE_RESTART:  # on-topic opener as context, then a restart made unlikely
        opener, restart = (row.get("distraction") or "").strip(), (row.get("restart") or "").strip()
        if not opener or not restart:
            raise ValueError("false_restart row needs an opener (distraction) and a restart")
        masked_text, trained_texts = opener, [" " + restart, ""]
    else:
        raise ValueError(f"unknown row kind {kind!r}")

    prompt_text = render_prompt(tokenizer, row["prompt"], system)
    prompt_ids = _encode(tokenizer, prompt_text)
    masked_ids = _encode(tokenizer, masked_text)
    restart_ids, answer_ids = (_encode(tokenizer, t) for t in trained_texts)
    for text, ids in ((prompt_text, prompt_ids), (masked_text, masked_ids), ("".join(trained_texts), restart_ids + answer_ids)):
        _check_no_added_bos(tokenizer, text, ids)
    limit = normal_tokens if kind == "normal" and normal_tokens is not None else answer_tokens
    cut = limit is not None and len(answer_ids) > limit
    trained_ids = restart_ids + (answer_ids[:limit] if cut else answer_ids)
    if negative and unlikely_tokens is not None:
        trained_ids = trained_ids[:unlikely_tokens]
    if not trained_ids:
        return None
    if not cut and not negative:  # a false restart is cut off where it starts
        trained_ids += end_of_turn_ids(tokenizer) if eot is None else eot

    input_ids = prompt_ids + masked_ids + trained_ids
    if len(input_ids) > max_length:
        return None
    skip = min(normal_skip, len(trained_ids)) if kind == "normal" else 0
    if skip == len(trained_ids):
        return None
    labels = [IGNORE] * (len(prompt_ids) + len(masked_ids) + skip) + trained_ids[skip:]
    unlikely = labels if negative else [IGNORE] * len(labels)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels,
            "n_loss_tokens": 0 if negative else len(trained_ids) - skip, UNLIKELY_COLUMN: unlikely,
            "answer_start": len(prompt_ids) + len(masked_ids) + len(restart_ids)}


def _map_row(row: dict[str, Any], tokenizer, max_length: int, options: dict[str, Any]) -> dict[str, Any]:
    """``Dataset.map`` cannot drop rows, so a status column records why a row goes;
    ``options`` are :func:`tokenize_row`'s keyword arguments."""
    out = tokenize_row(row, tokenizer, max_length, **options)
    if out is not None:
        return {**out, "_status": "ok"}
    # tell the two reasons apart: a row that fits but trains nothing vs. one that is too long
    status = "no_loss" if tokenize_row(row, tokenizer, 10**9, **options) is None else "too_long"
    return {"input_ids": [], "attention_mask": [], "labels": [], "n_loss_tokens": 0, "answer_start": 0,
            UNLIKELY_COLUMN: [], "_status": status}


def _fingerprint(ds: "datasets.Dataset", tokenizer, max_length: int, options: dict[str, Any]) -> str:
    """A cheap cache key for ``Dataset.map``: by default datasets dill-hashes the whole
    tokenizer (slow for a large vocabulary such as Gemma's) on every call."""
    key = [getattr(ds, "_fingerprint", None), tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template,
           max_length, sorted(options.items()), _FORMAT]
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]


def tokenize_dataset(
    ds: "datasets.Dataset",
    tokenizer,
    max_length: int,
    system: str | None = None,
    num_proc: int = 1,
    extra_columns: dict[str, list] | None = None,
    keep: tuple[str, ...] = (),
    answer_tokens: int | None = None,
    normal_tokens: int | None = None,
    normal_skip: int = 0,
    unlikely_tokens: int | None = None,
) -> tuple["datasets.Dataset", dict[str, int]]:
    """Tokenize and mask every row; returns (dataset with input_ids / attention_mask /
    labels, plus the ``keep`` columns of ``tokenize_row`` such as ``answer_start``, stats).
    Dropped rows are counted, never silently lost."""
    from datasets import Features, List, Value

    options = {"system": system, "eot": end_of_turn_ids(tokenizer), "answer_tokens": answer_tokens,
               "normal_tokens": normal_tokens, "normal_skip": normal_skip, "unlikely_tokens": unlikely_tokens}
    features = Features({"input_ids": List(Value("int32")), "attention_mask": List(Value("int8")),
                         "labels": List(Value("int32")), "n_loss_tokens": Value("int32"), "answer_start": Value("int32"),
                         UNLIKELY_COLUMN: List(Value("int32")), "_status": Value("string")})
    mapped = ds.map(
        _map_row,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "options": options},
        remove_columns=ds.column_names,
        features=features,
        new_fingerprint=_fingerprint(ds, tokenizer, max_length, options),
        num_proc=num_proc if num_proc > 1 else None,
        keep_in_memory=True,  # never write cache files into the user's dataset folder
        desc="tokenize",
    )
    status = list(mapped["_status"])
    kept = mapped.filter(lambda s: s == "ok", input_columns="_status", keep_in_memory=True)
    stats = {
        "rows_in": len(ds),
        "rows_kept": len(kept),
        "dropped_too_long": status.count("too_long"),
        "dropped_no_loss": status.count("no_loss"),
        "loss_tokens": int(sum(list(kept["n_loss_tokens"]))),
        "unlikely_tokens": int(sum(sum(1 for t in u if t != IGNORE) for u in kept[UNLIKELY_COLUMN])),
        "tokens": int(sum(len(ids) for ids in kept["input_ids"])),
    }
    kept = kept.select_columns(["input_ids", "attention_mask", "labels", *keep])
    for name, values in (extra_columns or {}).items():  # per-row values that follow the kept rows
        kept = kept.add_column(name, [v for v, st in zip(values, status) if st == "ok"])
    return kept, stats
