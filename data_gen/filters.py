"""Quality filters for transcripts, each counted by name in the dataset summary.

- ``length``: parts within word bounds.
- ``repetition``: no degenerate loops in the distraction or the answer.
- ``not_about_subject``: the distraction must be about the subject and away from the task:
  it names one of the subject's keywords, or it sits closer to the subject than to the
  prompt in sentence-embedding space (steered text is often about the subject's domain
  without naming it).
- ``answer_off_topic``: the answer must be closer to the prompt than to the subject and
  reasonably close to the prompt.
- ``restarted``: no restart language in the distraction or the answer (the restart
  detector of the evaluation): the parts must be clean, and a fine-tuned model writing its
  own second-round data restarts by itself now and then.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from esr_train.text import repetitive, word_count
from esr_train.restart_text import has_restart


@dataclass(frozen=True)
class FilterConfig:
    min_distraction_words: int = 5
    max_distraction_words: int = 160
    min_answer_words: int = 12
    max_answer_words: int = 450
    min_answer_prompt_similarity: float = 0.25
    subject_margin: float = 0.0


def keyword_hit(text: str, keywords: Sequence[str]) -> bool:
    low = text.lower()
    return any(re.search(rf"\b{re.escape(k.lower())}", low) for k in keywords if k)


def subject_keywords(subject: dict | str) -> list[str]:
    """The bank's keywords, or the subject's own content words when none are given."""
    if isinstance(subject, dict) and subject.get("keywords"):
        return list(subject["keywords"])
    name = subject["subject"] if isinstance(subject, dict) else subject
    stop = {"the", "a", "an", "of", "and", "in", "on", "to", "for", "its", "their", "history", "life"}
    return [w for w in re.findall(r"[a-z]+", name.lower()) if w not in stop and len(w) > 3]


def _text_problem(text: str, min_words: int, max_words: int) -> str | None:
    """The first failed filter every generated text shares: length, repetition, restart."""
    if not min_words <= word_count(text) <= max_words:
        return "length"
    if repetitive(text):
        return "repetition"
    if has_restart(text):
        return "restarted"
    return None


def answer_problems(prompts: Sequence[str], answers: Sequence[str], subjects: Sequence[str], cfg: FilterConfig) -> list[str | None]:
    """For each (prompt, answer) the name of the first failed filter, or None."""
    from esr_train.embeddings import cosine

    to_prompt = cosine(answers, prompts).tolist() if answers else []
    to_subject = cosine(answers, subjects).tolist() if answers and all(subjects) else [None] * len(answers)

    def off_topic(i: int) -> bool:
        return to_prompt[i] < cfg.min_answer_prompt_similarity or (
            to_subject[i] is not None and to_subject[i] >= to_prompt[i])

    return [_text_problem(ans, cfg.min_answer_words, cfg.max_answer_words) or
            ("answer_off_topic" if off_topic(i) else None) for i, ans in enumerate(answers)]


def distraction_problems(prompts: Sequence[str], distractions: Sequence[str], subjects: Sequence[dict | str],
                         cfg: FilterConfig) -> list[str | None]:
    """For each distraction the name of the first failed filter, or None."""
    from esr_train.embeddings import cosine

    if not distractions:
        return []
    names = [s["subject"] if isinstance(s, dict) else s for s in subjects]
    to_prompt = cosine(distractions, prompts).tolist()
    to_subject = cosine(distractions, names).tolist()

    def about_subject(i: int, text: str) -> bool:
        return keyword_hit(text, subject_keywords(subjects[i])) or to_subject[i] - to_prompt[i] > cfg.subject_margin

    return [_text_problem(text, cfg.min_distraction_words, cfg.max_distraction_words) or
            (None if about_subject(i, text) else "not_about_subject") for i, text in enumerate(distractions)]
