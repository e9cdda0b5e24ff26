"""Negative and false-restart rows: every row that teaches an adapter when *not* to restart.

Adapters trained on self-correction rows pick up a tic: unpushed, they restart after an
on-topic opener. Normal rows only teach what to say, never what not to say. The rows here
are the missing negatives, all of kind :data:`esr_train.rows.FALSE_RESTART`: on-topic text
as context (``distraction``) and a restart phrase (``restart``) whose tokens the trainer
makes unlikely (``esr_train.training.unlikelihood``).

Three sources, one shape:

* synthetic: a clean answer of the dataset cut after one of its first sentences, followed
  by a restart phrase from the dataset's own self-correction rows
  (:func:`false_restart_rows`; :func:`unpushed_negative_rows` repeats a self-correction
  row without its push);
* mined: the restarts a writer model actually makes when nothing pushed it, in its own
  words and where it makes them (:func:`mine`), and its own on-topic openers cut the
  same way (:func:`cut_openers`); ``esr probe`` and the self backend's
  ``restart_probes`` write them to ``false_restarts.jsonl`` beside the dataset, not in its
  splits, so a plain SFT tool reading the dataset never trains *toward* them;
* positive twins of mined rows (:func:`mined_positive_rows`), which restart with the mined
  phrase after off-topic text, so the loss can only separate the pair by the context.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from esr_train.errors import EsrError
from esr_train.records import json_objects
from esr_train.restart_text import find_restarts
from esr_train.rows import FALSE_RESTART
from esr_train.text import sentence_ends

FILE = "false_restarts.jsonl"
"""The mined rows' file in a dataset directory."""


class NegativeRowError(EsrError, ValueError):
    """Negatives that cannot be made or read (no restart phrases to use, a bad mined row)."""


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
    if not restarts:
        raise NegativeRowError("cutting openers needs restart phrases (the data's self-correction rows)")
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


def read_mined(dataset_dir: str | Path) -> list[dict]:
    """The mined rows of a dataset directory ([] when it has none); a bad line is a
    one-line error naming the file and line."""
    path = Path(dataset_dir) / FILE
    if not path.exists():
        return []
    rows = []
    for n, row in json_objects(path):
        missing = [c for c in ("prompt", "opener", "restart") if not row.get(c)]
        if missing:
            raise NegativeRowError(f"{path}:{n}: missing {', '.join(missing)}")
        rows.append(row)
    return rows


_LIST_MARKER = re.compile(r"(?:^|\n)\s*(?:\d+[.)]|[-*•]+)$")


def opener_cuts(answer: str, max_sentences: int) -> list[int]:
    """Where an answer can be cut after one of its first ``max_sentences`` sentences with
    more of the answer still to come (the spot where the tic restarts); list numbers such
    as "1." are not sentence ends."""
    ends = [e for e in sentence_ends(answer) if not _LIST_MARKER.search(answer[:e])]
    return [e for e in ends[:max_sentences] if answer[e:].strip()]


def restart_phrases(rows) -> list[str]:
    """The distinct restart phrases of the self-correction rows among ``rows``, sorted: the
    phrases a false restart is given after an on-topic opener."""
    return sorted({r["restart"].strip() for r in rows if r.get("kind") == "self_correction" and r.get("restart")})


def false_restart_rows(rows, seed: int, max_sentences: int = 3, every_cut: bool = False) -> list[dict[str, Any]]:
    """One negative per normal row that has a place to cut: its answer up to a sentence
    end, then a restart phrase from the self-correction rows of the same data, both chosen
    by ``seed``. Rows too short to cut are skipped (counted by the caller).

    With ``every_cut`` a row gives one negative at each of its cuts instead of one at a
    random cut (a control for where the negative sits)."""
    rows = list(rows)
    restarts = restart_phrases(rows)
    if not restarts:
        raise NegativeRowError("unlikelihood_weight needs self-correction rows: their restart phrases are the negatives")
    rng = random.Random(seed)
    out = []
    for row in rows:
        if row.get("kind") != "normal":
            continue
        answer = (row.get("answer") or "").strip()
        cuts = opener_cuts(answer, max_sentences)
        if not cuts:
            continue
        for cut in cuts if every_cut else [rng.choice(cuts)]:
            out.append({**row, "kind": FALSE_RESTART, "distraction": answer[:cut],
                        "restart": rng.choice(restarts), "answer": "", "subject": ""})
    return out


def mined_negative_rows(mined, columns) -> list[dict[str, Any]]:
    """The writer's own false restarts (:func:`mine`, by ``restart_probes`` or ``esr probe``) as negatives of the same shape as :func:`false_restart_rows`, with
    every other dataset column ``columns`` empty."""
    blank = {c: "" for c in columns}
    return [{**blank, "id": f"mined-{i}", "prompt": r["prompt"], "distraction": r["opener"], "restart": r["restart"],
             "kind": FALSE_RESTART, "model": r.get("model", ""), "seed": int(r.get("seed", 0)),
             **({"messages": []} if "messages" in blank else {})}
            for i, r in enumerate(mined)]


def unpushed_negative_rows(rows) -> list[dict[str, Any]]:
    """One negative per self-correction row: the same drift as context and the same restart
    made unlikely, but trained without the push (only self-correction rows are pushed); a
    row without a drift or restart is refused by ``tokenize_row`` as its positive is.

    A positive and its unpushed twin share every token, so the only thing that can tell the
    adapter to restart in one and not the other is the push in its residual stream, which
    is what resisting *steering* means; the text alone stops being a cue."""
    return [{**row, "id": f"{row.get('id', i)}-unpushed", "kind": FALSE_RESTART, "answer": "", "subject": ""}
            for i, row in enumerate(rows) if row.get("kind") == "self_correction"]


def mined_positive_rows(mined, rows, seed: int) -> list[dict[str, Any]]:
    """One self-correction row per mined false restart, restarting with the mined phrase
    after off-topic text: a copy of a self-correction row of the same prompt (any one when
    the data has none for it) with its restart replaced. Each negative then has a twin that
    differs only in what came before the phrase, so the loss can only separate them by the
    context (on-topic opener: unlikely; drift: likely), not by the phrase."""
    rows = list(rows)
    corrections = [r for r in rows if r.get("kind") == "self_correction" and r.get("distraction") and r.get("answer")]
    if not corrections:
        raise NegativeRowError("mined_positives needs self-correction rows to copy")
    by_prompt: dict[str, list[dict]] = {}
    for r in corrections:
        by_prompt.setdefault(r["prompt"], []).append(r)
    rng = random.Random(seed)
    return [{**rng.choice(by_prompt.get(m["prompt"], corrections)), "id": f"mined-pair-{i}", "restart": m["restart"],
             **({"messages": []} if "messages" in rows[0] else {})}
            for i, m in enumerate(mined)]


def with_false_restarts(split, seed: int, max_sentences: int, mined=(), mined_positives: bool = False,
                        unpushed: bool = False, every_cut: bool = False):
    """The ``datasets`` split ``split`` plus one false-restart negative per normal row that
    can be cut and one per ``mined`` row (the writer's own false restarts), with ``unpushed`` one per self-correction
    row (its drift and restart without the push), and with ``mined_positives`` a
    self-correction twin per mined row; returns (rows, number of negatives, number of twins)."""
    from datasets import Dataset, concatenate_datasets

    negatives = false_restart_rows(split, seed, max_sentences, every_cut) + mined_negative_rows(mined, split.column_names)
    if unpushed:
        negatives += unpushed_negative_rows(split)
    twins = mined_positive_rows(mined, split, seed) if mined_positives and mined else []
    if not negatives and not twins:
        return split, 0, 0
    return (concatenate_datasets([split, Dataset.from_list(negatives + twins, features=split.features)]),
            len(negatives), len(twins))
