"""Sentence-level text handling for transcripts: cutting a distraction at a sentence
boundary (so the restart never starts mid-sentence) and spotting degenerate repetition."""

from __future__ import annotations

import re

# a sentence ends at . ! ? or … (plus closing quotes/brackets) followed by space or end;
# decimals like 3.5 and abbreviations like "e.g." are not ends.
_SENTENCE = re.compile(r".+?(?:(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)(?<!\bMr)(?<!\bDr)(?<!\bSt)[.!?…][\"'”’)\]]*)(?=\s|$)", re.S)
_WORD = re.compile(r"[A-Za-z0-9']+")
# an unfinished list item left at the end: "\n2." or "\n- " or "\n**"
_LIST_MARKER_TAIL = re.compile(r"(?:\n\s*(?:\d+[.)]|[-*•]+|#+)?\s*)+$")


def sentences(text: str) -> list[str]:
    """Complete sentences of ``text`` in order; a trailing fragment is dropped."""
    text = " ".join(text.split())
    return [s.strip() for s in _SENTENCE.findall(text) if re.search(r"\w", s)]


def sentence_ends(text: str) -> list[int]:
    """Offsets just past each complete sentence of ``text`` as written (newlines and lists
    kept), so a cut at one of them leaves the text exactly as the model wrote it."""
    return [m.end() for m in _SENTENCE.finditer(text) if re.search(r"\w", m.group())]


def first_sentences(text: str, n: int) -> str:
    """The first ``n`` complete sentences (fewer if the text has fewer), or ''."""
    return " ".join(sentences(text)[:n])


def complete_part(text: str) -> str:
    """``text`` cut back to its last complete sentence; multi-line answers keep their
    lines (lists, steps) and lose only an unfinished tail."""
    text = _LIST_MARKER_TAIL.sub("", text.strip())
    if not text:
        return ""
    if not re.search(r"[.!?…][\"'”’)\]]*$", text):
        cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"), text.rfind("!\n"), text.rfind("?\n"))
        text = text[: cut + 1].strip() if cut >= 0 else ""
    return _LIST_MARKER_TAIL.sub("", text).strip()


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def repetitive(text: str, run: int = 4, min_distinct_trigrams: float = 0.6) -> bool:
    """Degenerate text: a word repeated ``run`` times in a row, or too few distinct word
    trigrams (steered small models loop: "a planet of a planet of a planet")."""
    if degenerate_repetition(text, run=run):
        return True
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < 12:
        return False
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) < min_distinct_trigrams


_NON_WORD = re.compile(r"[^\w]+")


def degenerate_repetition(text: str, run: int = 5) -> bool:
    """True when one word occurs ``run`` or more times in a row.

    The study's optional filter for degenerate steered output ("the the the
    the the"): comparison is case-insensitive and ignores punctuation, so
    "Wait, wait. WAIT! wait wait" is a run of five.
    """
    if run < 1:
        raise ValueError(f"run must be >= 1, got {run}")
    previous: str | None = None
    length = 0
    for token in text.split():
        word = _NON_WORD.sub("", token).lower()
        if not word:
            continue  # pure punctuation such as "—" neither counts nor breaks a run
        length = length + 1 if word == previous else 1
        previous = word
        if length >= run:
            return True
    return False
