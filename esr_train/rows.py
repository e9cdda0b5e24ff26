"""The transcript row: structured parts, so nothing downstream ever re-parses text.

Every backend yields ``Transcript`` objects; the builder turns them into dataset rows with
the columns below. The trainer tokenizes the parts with each model's own chat template and
masks the user prompt and the distraction from the loss; this module only guarantees the
parts are clean (a distraction ends on a sentence boundary; restart and answer are
non-empty) and builds the plain-chat ``messages`` view for any SFT tool.
"""

from __future__ import annotations

from esr_train.errors import EsrError
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

KINDS = ("self_correction", "normal")
TRAIN_COLUMNS = ("prompt", "kind", "distraction", "restart", "answer")
"""The columns ``esr train`` reads from every split of a dataset."""
COLUMNS = ("id", "prompt", "distraction", "restart", "answer", "subject", "kind", "backend", "model", "seed", "messages")
UNLIKELY_COLUMN = "unlikely"
"""Tokenized column: the token id at positions trained by unlikelihood, -100 elsewhere."""
FALSE_RESTART = "false_restart"
"""Row kind of the negatives: ``distraction`` holds the on-topic opener (context only),
``restart`` the phrase whose tokens are made unlikely, ``answer`` is empty."""
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")


def stable_fraction(text: str) -> float:
    """A number in [0, 1] fixed by ``text`` alone: assigns rows without a split field to
    train or test the same way on every run and machine."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF


class TranscriptError(EsrError, ValueError):
    """A transcript whose parts break the contract above."""


@dataclass
class Transcript:
    prompt: str
    answer: str
    kind: str = "normal"
    distraction: str = ""
    restart: str = ""
    subject: str = ""
    backend: str = ""
    model: str = ""
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def validate(self) -> "Transcript":
        self.prompt, self.answer = self.prompt.strip(), self.answer.strip()
        self.distraction, self.restart = self.distraction.strip(), self.restart.strip()
        if self.kind not in KINDS:
            raise TranscriptError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.prompt:
            raise TranscriptError("empty prompt")
        if not self.answer:
            raise TranscriptError("empty answer")
        if self.kind == "self_correction":
            if not self.distraction:
                raise TranscriptError("self_correction row without a distraction")
            if not self.restart:
                raise TranscriptError("self_correction row without a restart phrase")
            if not _SENTENCE_END.search(self.distraction):
                raise TranscriptError("distraction does not end on a sentence boundary")
            if not self.subject:
                raise TranscriptError("self_correction row without a subject")
        elif self.distraction or self.restart:
            raise TranscriptError("normal row with a distraction or restart")
        return self

    @property
    def assistant_text(self) -> str:
        """The whole assistant turn as one string."""
        if self.kind == "normal":
            return self.answer
        return f"{self.distraction} {self.restart} {self.answer}"

    @property
    def id(self) -> str:
        """A content hash: equal transcripts share an id (used to drop duplicates)."""
        key = json.dumps([self.prompt, self.distraction, self.restart, self.answer], ensure_ascii=False)
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]

    def to_row(self) -> dict:
        self.validate()
        row = {k: v for k, v in asdict(self).items() if k != "extra"}
        row["id"] = self.id
        row["messages"] = [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.assistant_text},
        ]
        return {k: row[k] for k in COLUMNS}

    @classmethod
    def from_row(cls, row: dict) -> "Transcript":
        return cls(**{k: row[k] for k in ("prompt", "answer", "kind", "distraction", "restart", "subject",
                                          "backend", "model", "seed") if k in row})
