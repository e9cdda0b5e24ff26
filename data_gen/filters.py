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


def answer_problems(prompts: Sequence[str], answers: Sequence[str], subjects: Sequence[str], cfg: FilterConfig) -> list[str | None]:
    """For each (prompt, answer) the name of the first failed filter, or None."""
    from esr_train.embeddings import cosine

    out: list[str | None] = [None] * len(answers)
    to_prompt = cosine(answers, prompts).tolist() if answers else []
    to_subject = cosine(answers, subjects).tolist() if answers and all(subjects) else [None] * len(answers)
    for i, ans in enumerate(answers):
        if not cfg.min_answer_words <= word_count(ans) <= cfg.max_answer_words:
            out[i] = "length"
        elif repetitive(ans):
            out[i] = "repetition"
        elif has_restart(ans):
            out[i] = "restarted"
        elif to_prompt[i] < cfg.min_answer_prompt_similarity or (to_subject[i] is not None and to_subject[i] >= to_prompt[i]):
            out[i] = "answer_off_topic"
    return out


def distraction_problems(prompts: Sequence[str], distractions: Sequence[str], subjects: Sequence[dict | str],
                         cfg: FilterConfig) -> list[str | None]:
    """For each distraction the name of the first failed filter, or None."""
    from esr_train.embeddings import cosine

    names = [s["subject"] if isinstance(s, dict) else s for s in subjects]
    out: list[str | None] = [None] * len(distractions)
    if not distractions:
        return out
    to_prompt = cosine(distractions, prompts).tolist()
    to_subject = cosine(distractions, names).tolist()
    for i, text in enumerate(distractions):
        if not cfg.min_distraction_words <= word_count(text) <= cfg.max_distraction_words:
            out[i] = "length"
        elif repetitive(text):
            out[i] = "repetition"
        elif has_restart(text):
            out[i] = "restarted"
        elif not (keyword_hit(text, subject_keywords(subjects[i])) or to_subject[i] - to_prompt[i] > cfg.subject_margin):
            out[i] = "not_about_subject"
    return out
