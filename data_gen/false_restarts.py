"""The writer's own false restarts, mined as negatives for unlikelihood training.

An adapter trained on self-correction rows restarts now and then when nothing pushed it
(the evaluation's unsteered false restarts). The synthetic negatives of
``esr_train.training.unlikelihood`` cut a clean answer and append a restart phrase from
the data; these are the restarts the model actually makes, in its own words and at the
points where it makes them. With ``restart_probes: k`` the self backend samples k unsteered
answers per training prompt (the evaluation's temperature and horizon) from the writer
(the round-one adapter in an on-policy second round), and every answer with restart
language becomes a row: the on-topic text before the restart as context, the restart span
as the tokens to make unlikely.

``cut_openers`` takes the probe answers that did *not* restart: each is cut after one of
its first sentences and a restart phrase of the data follows, so the negatives carry the
writer's own on-topic openers, not the base model's (docs/results.md R37 found negatives
cut from the base model's answers leave the round-one tic where it was). ``esr probe``
(``data_gen.probe``) writes both kinds for a trained adapter in one sampling batch.

The rows live in ``false_restarts.jsonl`` beside the dataset, not in its splits, so a plain
SFT tool reading the dataset never trains *toward* them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Sequence

from esr_train.records import json_objects
from eval.attempts import find_restarts

FILE = "false_restarts.jsonl"


def mine(prompt: str, texts: Iterable[str], model: str, seed: int = 0) -> tuple[list[dict], int]:
    """Rows from the sampled answers ``texts`` to ``prompt`` that restart: the text before
    the first restart (stripped) and the restart span. A restart with no opener before it
    is counted (second value) but not kept: the negative needs on-topic text as its context."""
    rows, bare = [], 0
    for text in texts:
        spans = find_restarts(text)
        if not spans:
            continue
        start, end = spans[0]
        opener, restart = text[:start].strip(), text[start:end].strip()
        if not opener:
            bare += 1
            continue
        rows.append({"prompt": prompt, "opener": opener, "restart": restart, "model": model, "seed": seed,
                     "source": "restart"})
    return rows, bare


def mine_each(texts: dict[str, list[str]], model: str, seed: int = 0) -> tuple[list[dict], int]:
    """:func:`mine` over every prompt's samples ``texts`` (prompt -> answers), in order."""
    rows, bare = [], 0
    for prompt, answers in texts.items():
        got, no_opener = mine(prompt, answers, model, seed)
        rows += got
        bare += no_opener
    return rows, bare


def cut_openers(prompt: str, texts: Iterable[str], restarts: Sequence[str], rng: random.Random, model: str,
                seed: int = 0, max_sentences: int = 3, every_cut: bool = False) -> list[dict]:
    """Negatives from the answers ``texts`` to ``prompt`` that have no restart language:
    each cut after one of its first ``max_sentences`` sentences (all of them with
    ``every_cut``), with a phrase from ``restarts`` as the restart to make unlikely. An
    answer too short to cut gives nothing."""
    from esr_train.training.unlikelihood import opener_cuts

    if not restarts:
        raise ValueError("cutting openers needs restart phrases (the data's self-correction rows)")
    rows = []
    for text in texts:
        if find_restarts(text):
            continue
        cuts = opener_cuts(text, max_sentences)
        if not cuts:
            continue
        for cut in cuts if every_cut else [rng.choice(cuts)]:
            rows.append({"prompt": prompt, "opener": text[:cut].strip(), "restart": rng.choice(restarts),
                         "model": model, "seed": seed, "source": "opener"})
    return rows


def read(dataset_dir: str | Path) -> list[dict]:
    """The mined rows of a dataset directory ([] when it has none); a bad line is a
    one-line error naming the file and line."""
    path = Path(dataset_dir) / FILE
    if not path.exists():
        return []
    rows = []
    for n, row in json_objects(path):
        missing = [c for c in ("prompt", "opener", "restart") if not row.get(c)]
        if missing:
            raise ValueError(f"{path}:{n}: missing {', '.join(missing)}")
        rows.append(row)
    return rows
