"""The ``template`` backend: no model; transcripts assembled from supplied texts.

Input is JSONL, one object per line: ``prompt`` and ``answer`` (required), and for a
self-correction row ``distraction`` and ``subject`` (``restart`` optional: one is drawn
from the phrase bank, seeded, when absent); ``split`` optional (else by a stable hash of
the prompt). Fast and deterministic: for custom corpora and tests.
"""

from __future__ import annotations

import random
from pathlib import Path

from esr_train.banks import BankError, format_restart
from esr_train.rows import Transcript, TranscriptError, stable_fraction
from esr_train.text import complete_part
from esr_train.records import json_objects

REQUIRED = ("prompt", "answer")


def read_template_rows(path: str | Path, phrases: list[dict], rng: random.Random, cfg) -> list[tuple[str, Transcript]]:
    path = Path(path)
    if not path.exists():
        raise BankError(f"{path}: no such template file")
    out: list[tuple[str, Transcript]] = []
    for lineno, obj in json_objects(path, BankError):
        for key in REQUIRED:
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise BankError(f"{path}:{lineno}: missing or empty {key!r}")
        distraction = complete_part(obj.get("distraction") or "")
        if obj.get("distraction") and not distraction:
            raise BankError(f"{path}:{lineno}: distraction has no complete sentence")
        subject = obj.get("subject") or ""
        if distraction and not subject:
            raise BankError(f"{path}:{lineno}: a row with a distraction needs its 'subject'")
        restart = obj.get("restart") or (format_restart(rng.choice(phrases), subject) if distraction else "")
        kind = "self_correction" if distraction else "normal"
        t = Transcript(obj["prompt"], obj["answer"], kind, distraction, restart, subject, "template",
                       obj.get("model", ""), cfg.seed)
        try:
            t.validate()
        except TranscriptError as exc:
            raise BankError(f"{path}:{lineno}: {exc}") from None
        split = obj.get("split")
        if split is None:
            split = "test" if stable_fraction(t.prompt) < cfg.test_size else "train"
        if split not in ("train", "test"):
            raise BankError(f"{path}:{lineno}: split must be 'train' or 'test', got {split!r}")
        out.append((split, t))
    if not out:
        raise BankError(f"{path}: has no rows")
    return out[: cfg.n] if cfg.n else out
