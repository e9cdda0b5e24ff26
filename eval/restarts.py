"""Find restarts by meaning: the offline judge's two-tier restart detector.

A restart is text where a response explicitly abandons the answer in progress and starts
over (the study's rule). The detector reads a response clause by clause:

* **Tier 1, the regexes** of :mod:`esr_train.restart_text`: precise restart phrases at sentence
  starts ("Wait, that's not right", "Let me try again").
* **Tier 2, meaning**: every clause is embedded with the bundled all-MiniLM-L6-v2 model
  and scored by a logistic classifier fitted on ``eval/resources/restart_prototypes.txt``
  for being meta-commentary that abandons the answer ("My mind wandered there", "Pardon
  the digression", "..., which has nothing to do with your question").

Adjacent candidate clauses form one candidate span (a span goes on over the clauses after
it that score at least ``extend``, and two spans in one sentence are one). A span is a
restart when

* it is an unmistakable repair: it holds a tier-1 repair phrase ("Wait, no", "I made a
  mistake", "Let me start over") or a clause scoring at least ``strong``; or
* it is a likely repair (a clause scoring at least ``weak``, or a tier-1 phrase that also
  occurs as style, such as "Oops," or "Back to your question"), it abandons a drift toward
  the steered concept, and the text after it turns back: the rise in cosine similarity to
  the prompt from the text before it to the text after it, plus the fall in similarity to
  the concept (which must fall), is at least ``turn``; or
* it is a faint one (a clause scoring at least ``faint``) and that turn is at least
  ``sharp_turn``.

The turn is measured only for a steered response (there is a concept to drift toward): an
unsteered response restarts only with an unmistakable repair. Every span needs an attempt to
abandon before it, back to the previous span: at least ``min_words`` words before restart
meaning alone, one before a tier-1 phrase. A chatty opener ("Great question!") is no attempt
to abandon.

A span is never a restart when its clauses sit inside quoted speech or in a conditional
sentence ("If it cracks, start again"), or when no answer text follows it. The span covers
every adjacent clause of commentary, including sentences that name the distraction, so the
attempt scored after it is the answer alone.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import astuple, dataclass, replace
from functools import lru_cache
from importlib import resources

import torch

from esr_train.restart_text import Phrase, only_commentary, restart_phrases

__all__ = ["DetectorSettings", "Restart", "RestartDetector", "clauses", "load_prototypes", "split_at"]

# ------------------------------------------------------------------ segmentation

_SENTENCE_END = re.compile(r"[.!?…]+(?=[\s\"'”’)\]*_]|$)|\n+")
# Clause separators inside a sentence: , ; : ( ) and spaced or doubled dashes.
_CLAUSE_SEP = re.compile(r"[,;:()]|\s[—–-]{1,2}\s|—|–|--")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")
_ALNUM = re.compile(r"[^\W_]")
_LETTER = re.compile(r"[^\W\d_]")
# A restart statement run into the next sentence without punctuation: "...start over To park".
_GLUED = re.compile(r"\s+(?=[A-Z])")
_EDGE = " \t\r\n\"'“”‘’*_`>#-—–"
# Interjections stripped before the conditional test ("Whoops, if the glue leaks, ...").
_LEAD = re.compile(r"(?:(?:oh|ah|well|so|okay|ok|oops|whoops|now|and|but|then|also|just)\b[\s,.!—–-]*)*", re.I)
_CONDITIONAL = re.compile(r"(?:if|when|whenever|once|unless|until|in\s+case|should\s+(?:it|you|the))\b", re.I)
# Words a clause of commentary about the answer nearly always holds. A clause with none of
# them is not embedded (it scores 0), which keeps the judge fast on plain answer text.
_CUES = re.compile(
    r"\b(?:i|i['’]\w+|me|my|myself|we|us|our|let\w*|you\w*|wait\w*|hold|hang|h+m+|u+h+|u+m+|e+r+m*|e+h|a+h+e*m*|"
    r"oh|ah|argh|ugh|oops|whoops|whoa|yikes|ok\w*|sorry|apolog\w*|pardon|excuse|forg\w+|never\w*|mind\w*|"
    r"ignor\w*|disregard\w*|scratch\w*|strike|skip\w*|drop\w*|anyway|anyhow|back\w*|return\w*|again|over|"
    r"re\w+|start\w*|begin\w*|began|fresh\w*|tak\w+|took|tr\w+|attempt\w*|correct\w*|fix\w*|wrong\w*|"
    r"mistak\w*|error\w*|question\w*|topic\w*|point\w*|answer\w*|ask\w*|subject\w*|tangent\w*|digress\w*|"
    r"detour\w*|aside|irrelevan\w*|unrelated|relevan\w*|track\w*|course|focus\w*|wander\w*|drift\w*|stray\w*|"
    r"rambl\w*|distract\w*|sidetrack\w*|lost|los\w+|thread|place|plot|why|what\w*|where|how|no|nope|not|stop\w*|"
    r"nothing|none|useless|help\w*|proper\w*|actual\w*|real\w*|meant|mean\w*|silly|weeds|derail\w*|veer\w*|"
    r"off|once|more|plain\w*|edit\w*|carried|away|mix\w*|slip\w*|pulled|turned|two|second|another|full)\b",
    re.I,
)


@dataclass(frozen=True)
class Clause:
    start: int
    end: int
    sentence: int


def _trim(text: str, lo: int, hi: int) -> tuple[int, int]:
    while lo < hi and text[lo] in _EDGE:
        lo += 1
    while hi > lo and text[hi - 1] in _EDGE:
        hi -= 1
    return lo, hi


def sentences(text: str, cuts: Sequence[int] = ()) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence, covering the text: cut after . ! ? … , at
    newlines and at the offsets ``cuts``; a piece without letters (a list number, a lone
    newline) joins the next."""
    out: list[tuple[int, int]] = []
    pos = start = 0
    for end in sorted({m.end() for m in _SENTENCE_END.finditer(text)} | set(cuts) | {len(text)}):
        if end > pos and _LETTER.search(text, pos, end):
            out.append((start, end))
            start = end
        pos = end
    if not out:
        return [(0, len(text))]
    out[-1] = (out[-1][0], len(text))
    return out


def clauses(text: str, cuts: Sequence[int] = ()) -> list[Clause]:
    """Clauses of ``text`` in order: sentences (see :func:`sentences`) cut at , ; : ( ) and dashes, where a piece
    of at most two words ("Wait", "Hmm, no", "and") joins the piece after it (or, at the
    end of a sentence, the piece before it). Offsets index ``text``; edges are trimmed of
    whitespace, quotes, markdown markers and dashes."""
    out: list[Clause] = []
    for index, (s_lo, s_hi) in enumerate(sentences(text, cuts)):
        pieces: list[list[int]] = []
        pos = s_lo
        for m in _CLAUSE_SEP.finditer(text, s_lo, s_hi):
            pieces.append([pos, m.end()])
            pos = m.end()
        pieces.append([pos, s_hi])
        merged: list[list[int]] = []
        carry: int | None = None
        for lo, hi in pieces:
            if carry is not None:
                lo, carry = carry, None
            if len(_WORD.findall(text[lo:hi])) <= 2 and not text[lo:hi].rstrip().endswith(":"):
                carry = lo
                continue
            merged.append([lo, hi])
        if carry is not None:
            if merged:
                merged[-1][1] = s_hi
            else:
                merged.append([carry, s_hi])
        for lo, hi in merged:
            lo, hi = _trim(text, lo, hi)
            if _ALNUM.search(text[lo:hi]):
                out.append(Clause(lo, hi, index))
    return out


def _quoted(text: str) -> list[bool]:
    """Per character: inside double quotes (straight or curly) or curly single quotes."""
    inside = [False] * len(text)
    state = False
    single = False
    for i, ch in enumerate(text):
        if ch == '"':
            state = not state
        elif ch == "“":
            state = True
        elif ch == "”":
            state = False
        elif ch == "‘" and (i == 0 or not text[i - 1].isalnum()):
            single = True
        elif ch == "’" and single and (i + 1 == len(text) or not text[i + 1].isalnum()):
            single = False
        inside[i] = state or single or ch in "”’"
    return inside


# ------------------------------------------------------------------ the classifier


def load_prototypes(text: str | None = None) -> tuple[list[str], list[int]]:
    """Clauses and labels (1 restart commentary, 0 other) of the prototype file."""
    if text is None:
        text = resources.files("eval.resources").joinpath("restart_prototypes.txt").read_text(encoding="utf-8")
    clauses_, labels = [], []
    label: int | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        header = re.fullmatch(r"\[(positive|negative):[^\]]*\]", line)
        if header:
            label = int(header.group(1) == "positive")
            continue
        if label is None:
            raise ValueError(f"restart_prototypes.txt:{lineno}: clause before any [positive|negative: ...] header")
        clauses_.append(line)
        labels.append(label)
    return clauses_, labels


@lru_cache(maxsize=4)
def _classifier(digest: str, c: float):
    """Logistic regression on the prototypes' embeddings: (weights, bias) as tensors."""
    from sklearn.linear_model import LogisticRegression

    from esr_train.embeddings import embed

    texts, labels = load_prototypes()
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    model.fit(embed(texts).numpy(), labels)
    return torch.tensor(model.coef_[0], dtype=torch.float32), float(model.intercept_[0])


def prototypes_digest() -> str:
    raw = resources.files("eval.resources").joinpath("restart_prototypes.txt").read_bytes()
    return hashlib.sha1(raw).hexdigest()[:12]


# ------------------------------------------------------------------ detection


@dataclass(frozen=True)
class DetectorSettings:
    """Thresholds of the decision rule in the module docstring."""

    strong: float = 0.95
    weak: float = 0.65
    faint: float = 0.4
    extend: float = 0.45
    turn: float = 0.3
    sharp_turn: float = 0.7
    min_words: int = 12
    context_chars: int = 240
    c: float = 1.0


@dataclass
class _Span:
    """Adjacent clauses ``(start, end, meaning, phrase)`` of one candidate restart."""

    parts: list[tuple[int, int, float, Phrase | None]]
    sentence: int

    @property
    def start(self) -> int:
        return self.parts[0][0]

    @property
    def end(self) -> int:
        return self.parts[-1][1]

    @property
    def meaning(self) -> float:
        return max(p for _, _, p, _ in self.parts)

    @property
    def repair(self) -> bool:
        return any(ph is not None and ph.repair for *_, ph in self.parts)

    @property
    def phrase(self) -> bool:
        return any(ph is not None for *_, ph in self.parts)

    @property
    def statement(self) -> bool:
        return any(ph is not None and ph.statement for *_, ph in self.parts)


@dataclass(frozen=True)
class Restart:
    """One restart: ``response[start:end]`` announces it. ``meaning`` is the highest
    clause probability inside it, ``regex`` whether a tier-1 phrase starts inside it,
    ``turn`` the gain in similarity to the prompt across it plus the fall in similarity to
    the steered concept (None when not measured)."""

    start: int
    end: int
    meaning: float
    regex: bool
    turn: float | None


def split_at(response: str, restarts: Sequence[Restart]) -> list[tuple[str, str | None]]:
    """``(attempt body, restart text that opened it or None)`` for each attempt: the text
    between restarts, stripped; an attempt without alphanumeric text is dropped (its
    restart text then joins the next attempt's)."""
    out: list[tuple[str, str | None]] = []
    pos, opener = 0, None
    for r in list(restarts) + [Restart(len(response), len(response), 0.0, False, None)]:
        body = response[pos:r.start].strip(" \t\r\n—–-")
        if _ALNUM.search(body):
            out.append((body, opener))
            opener = None
        text = response[r.start:r.end].strip()
        if text:
            opener = text if opener is None else f"{opener} {text}"
        pos = r.end
    return out


class RestartDetector:
    """See the module docstring. ``find`` takes responses with their prompts, batched."""

    def __init__(self, settings: DetectorSettings | None = None) -> None:
        self.settings = s = settings or DetectorSettings()
        self._digest = prototypes_digest()  # read once: meaning() runs on every judged batch
        self.name = ":".join(["restarts", self._digest, *map(str, astuple(s))])

    def meaning(self, texts: Sequence[str]) -> list[float]:
        """Probability that each clause is restart commentary."""
        from esr_train.embeddings import embed

        if not texts:
            return []
        w, b = _classifier(self._digest, self.settings.c)
        return torch.sigmoid(embed(list(texts)) @ w + b).tolist()

    def find(self, responses: Sequence[str], prompts: Sequence[str],
             concepts: Sequence[str] | None = None) -> list[list[Restart]]:
        """The restarts of each response, in order (see the module docstring). ``concepts``
        holds the steered concept of each response ("" or None for an unsteered one, which
        restarts only with an unmistakable repair)."""
        from esr_train.embeddings import embed

        s = self.settings
        rows_of = [self._clause_rows(text) for text in responses]
        texts = list(dict.fromkeys(body for rows, _ in rows_of for _, body, _, scored in rows if scored))
        prob = dict(zip(texts, self.meaning(texts)))

        # candidate spans, then the windows their turn-back test reads
        plans, windows = [], {}
        concepts = list(concepts) if concepts is not None else [""] * len(responses)
        for text, prompt, concept, (rows, cuts) in zip(responses, prompts, concepts, rows_of):
            plan, previous_end = [], 0
            bounds = sentences(text, cuts)
            for span in self._spans(text, rows, prob):
                lo, hi, p, repair, phrase = span.start, span.end, span.meaning, span.repair, span.phrase
                before, after = self._context(text, bounds, lo, hi, previous_end)
                previous_end = hi
                if not _ALNUM.search(after):
                    continue  # nothing follows: no new attempt
                unmistakable = repair or p >= s.strong
                # (_spans already left an abandoned attempt before every span)
                measure = bool(not unmistakable and prompt and concept and _ALNUM.search(before))
                if measure:
                    windows.update(dict.fromkeys((after, before, prompt, concept)))
                plan.append((lo, hi, p, repair or phrase, unmistakable, measure, before, after))
            plans.append((prompt, concept, plan))
        vec = dict(zip(windows, embed(list(windows)))) if windows else {}

        found: list[list[Restart]] = []
        for prompt, concept, plan in plans:
            restarts = []
            for lo, hi, p, regex, unmistakable, measure, before, after in plan:
                turn = away = None
                if measure:
                    away = float((vec[before] - vec[after]) @ vec[concept])
                    turn = float((vec[after] - vec[before]) @ vec[prompt]) + away
                likely = regex or p >= s.weak
                turned = turn is not None and away > 0 and turn >= (s.turn if likely else s.sharp_turn)
                if unmistakable or turned:
                    restarts.append(Restart(lo, hi, round(p, 4), regex, None if turn is None else round(turn, 4)))
            found.append(restarts)
        return found

    @staticmethod
    def _clause_rows(text: str) -> tuple[list[tuple[Clause, str, Phrase | None, bool]], list[int]]:
        """Per clause: the clause, its text, the tier-1 phrase starting in it (or None) and
        whether its meaning is scored; and the extra sentence cuts used. Quoted clauses and
        the clauses of a conditional sentence are never candidates (no phrase, unscored). A
        restart statement glued to the next sentence ("Let me start over To park, ...") ends
        a sentence of its own."""
        quoted = _quoted(text)
        phrases = restart_phrases(text)
        cuts = [p.end for p in phrases if p.statement and _GLUED.match(text, p.end)]
        blocked_sentence = -1
        rows: list[tuple[Clause, str, Phrase | None, bool]] = []
        for u in clauses(text, cuts):
            body = text[u.start:u.end]
            letters = [quoted[i] for i in range(u.start, u.end) if text[i].isalnum()]
            in_quote = sum(letters) * 2 >= len(letters) > 0
            first = not rows or rows[-1][0].sentence != u.sentence
            if _CONDITIONAL.match(body, _LEAD.match(body).end()) and (first or blocked_sentence == u.sentence):
                blocked_sentence = u.sentence
            if in_quote or blocked_sentence == u.sentence:
                rows.append((u, body, None, False))
                continue
            hits = [p for p in phrases if u.start - 3 <= p.start < u.end]
            phrase = replace(hits[0], repair=any(p.repair for p in hits), statement=any(p.statement for p in hits)) \
                if hits else None
            rows.append((u, body, phrase, bool(_CUES.search(body))))
        return rows, cuts

    def _context(self, text: str, bounds: list[tuple[int, int]], lo: int, hi: int,
                 floor: int) -> tuple[str, str]:
        """The text just before ``lo`` (the start of its sentence, and the sentence before
        when that is short; never before ``floor``) and just after ``hi`` (to the end of its
        sentence, and the next when that is short), each at most ``context_chars`` long."""
        k = next(i for i, (a, b) in enumerate(bounds) if a <= lo < b or b == len(text))
        start = bounds[k][0]
        if lo - start < 60 and k > 0:
            start = bounds[k - 1][0]
        j = next(i for i, (a, b) in enumerate(bounds) if a <= hi < b or b == len(text))
        end = bounds[j][1]
        if end - hi < 60 and j + 1 < len(bounds):
            end = bounds[j + 1][1]
        n = self.settings.context_chars
        return text[max(start, floor, lo - n):lo].strip(), text[hi:min(end, hi + n)].strip()

    def _spans(self, text: str, rows, prob) -> list[_Span]:
        """Candidate spans: runs of adjacent candidate clauses (a tier-1 phrase, or meaning
        at least ``faint``). A run goes on over clauses scoring ``extend``; two runs in one
        sentence are one span, and so are two runs with only the rest of the first's
        sentence and at most one sentence of commentary between them. A run that holds a
        restart statement ("Let me start over") ends there unless likely commentary
        follows: the new answer starts after it. A run's leading clauses are dropped until
        the text before it (back to the previous run) holds ``min_words`` words, or one word
        before a tier-1 phrase: a restart needs an attempt to abandon."""
        s = self.settings
        spans: list[_Span] = []
        open_ = False
        for u, body, phrase, scored in rows:
            p = prob.get(body, 0.0) if scored else 0.0
            candidate = phrase is not None or p >= s.faint
            last = spans[-1] if spans else None
            if last is not None and last.statement:
                open_ = open_ and (phrase is not None or p >= s.weak)
            elif candidate and last is not None and last.sentence == u.sentence:
                open_ = True  # the same sentence as the last span: one restart
            elif not candidate:
                open_ = open_ and p >= s.extend
            if not (candidate or open_):
                continue
            if open_ and last is not None:
                last.parts.append((u.start, u.end, p, phrase))
                last.sentence = u.sentence
            else:
                spans.append(_Span([(u.start, u.end, p, phrase)], u.sentence))
            open_ = True
        # a restart abandons an attempt: a span's leading clauses of meaning alone are dropped
        # until at least min_words words precede it (a tier-1 phrase needs only one)
        kept: list[_Span] = []
        for span in spans:
            floor = kept[-1].end if kept else 0
            while span.parts:
                lo, _, _, phrase = span.parts[0]
                need = 1 if phrase is not None else s.min_words
                if len(_WORD.findall(text, floor, lo)) >= need:
                    break
                span.parts.pop(0)
            if span.parts:
                kept.append(span)
        merged: list[_Span] = []
        for span in kept:
            if merged and not merged[-1].statement:
                last = merged[-1]
                ended = bool(_SENTENCE_END.match(text, max(last.end - 1, 0)))
                if only_commentary(("." if ended else "") + text[last.end:span.start]):
                    last.parts += span.parts
                    continue
            merged.append(span)
        return merged
