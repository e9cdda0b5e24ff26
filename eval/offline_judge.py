"""The offline judge: attempts split at restarts (:mod:`eval.restarts`: restart phrases and
restart meaning), each attempt's answer scored 0-100 with the bundled sentence-embedding
model. No network, deterministic, fast on a CPU.

Scoring rule (documented in the README), for one attempt ``a`` of a response to prompt
``p`` while steered toward concept ``c``::

    on_topic = clip((cos(a, p) - r_lo) / (r_hi - r_lo), 0, 1)
    concept  = clip((cos(a, c) - c_lo) / (c_hi - c_lo), 0, 1)
    score    = 100 * on_topic * (1 - concept)        # 0 for degenerate repetition

Anchors are cosine similarities measured on real text: ``r_hi`` is the median similarity
of an on-topic answer to its own prompt, ``r_lo`` that of an answer to someone else's
prompt; ``c_hi`` is the median similarity of steered off-topic text to the concept's
label, ``c_lo`` that of on-topic answers to unrelated labels. The defaults were measured
(all-MiniLM-L6-v2) on SmolLM2-135M's own answers and steered distractions and agree with
the study's released transcripts (median prompt-answer similarity 0.74 there, 0.73 here;
answers to other prompts 0.08 / 0.06). :meth:`OfflineJudge.calibrated` re-measures
``r_hi``, ``r_lo`` and ``c_lo`` against the evaluated model's own unsteered reference
answers, so an on-topic answer of that model scores about 90 whatever its style.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from statistics import median

from eval.judging import JudgeItem, JudgeResult
from esr_train.text import degenerate_repetition
from eval.restarts import RestartDetector, split_at


@dataclass(frozen=True)
class Anchors:
    """Cosine similarities that map to the ends of the two 0-1 scales."""

    r_lo: float = 0.08
    r_hi: float = 0.72
    c_lo: float = 0.0
    c_hi: float = 0.35

    def __post_init__(self) -> None:
        if not (self.r_hi > self.r_lo and self.c_hi > self.c_lo):
            raise ValueError(f"offline judge anchors must satisfy r_hi > r_lo and c_hi > c_lo, got {self}")


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def attempt_score(relevance: float, concept: float, anchors: Anchors) -> float:
    """The scoring rule above, from the two cosine similarities."""
    on_topic = _clip01((relevance - anchors.r_lo) / (anchors.r_hi - anchors.r_lo))
    drift = _clip01((concept - anchors.c_lo) / (anchors.c_hi - anchors.c_lo))
    return round(100.0 * on_topic * (1.0 - drift), 2)


def _embed_unique(texts: Sequence[str]):
    """Embeddings of ``texts``, each distinct text embedded once (prompts and concepts repeat)."""
    from esr_train.embeddings import embed

    order = list(dict.fromkeys(texts))
    index = {t: i for i, t in enumerate(order)}
    return embed(order)[[index[t] for t in texts]]


class OfflineJudge:
    """Judge protocol implementation (see :mod:`eval.judging`). Attempts are split where
    :class:`eval.restarts.RestartDetector` finds a restart; each attempt's ``text`` is its
    answer alone and ``restart`` the text that announced it (None for the first), so the
    announcement, even when it names the distraction, is never scored."""

    def __init__(self, anchors: Anchors | None = None, repetition_run: int = 5,
                 detector: RestartDetector | None = None) -> None:
        self.anchors = anchors or Anchors()
        self.repetition_run = repetition_run
        self.detector = detector or RestartDetector()
        key = json.dumps([asdict(self.anchors), repetition_run, self.detector.name], sort_keys=True)
        self.name = f"offline:minilm:{hashlib.sha1(key.encode()).hexdigest()[:8]}"

    def calibrated(self, prompts: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> "OfflineJudge":
        """A judge whose relevance anchors come from ``references`` (on-topic answers to
        ``prompts``, e.g. the base model's unsteered answers) and whose concept floor comes
        from those answers against the unrelated ``labels``."""
        from esr_train.embeddings import embed

        pairs = [(p, r) for p, r in zip(prompts, references) if r.strip()]
        if len(pairs) < 3 or not labels:
            return self
        P = embed([p for p, _ in pairs])
        R = embed([r for _, r in pairs])
        own = (P * R).sum(-1).tolist()
        shift = [(i + 1 + random.Random(i).randrange(len(pairs) - 1)) % len(pairs) for i in range(len(pairs))]
        other = (P[shift] * R).sum(-1).tolist()
        floor = median((R @ embed(list(labels)).T).flatten().tolist())
        r_hi, r_lo = median(own), median(other)
        if r_hi - r_lo < 0.15:  # references barely closer to their prompts than to others: keep defaults
            return self
        anchors = replace(self.anchors, r_hi=round(r_hi, 4), r_lo=round(r_lo, 4),
                          c_lo=round(min(floor, self.anchors.c_hi - 0.1), 4))
        return OfflineJudge(anchors, self.repetition_run, self.detector)

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        from esr_train.embeddings import embed

        found = self.detector.find([it.response for it in items], [it.prompt for it in items],
                                   [it.concept or "" for it in items])
        split = [split_at(item.response, restarts) for item, restarts in zip(items, found)]
        flat = [(i, body, opener) for i, parts in enumerate(split) for body, opener in parts]
        results = [JudgeResult(details={"features": [], "restarts": [asdict(r) for r in restarts]})
                   for restarts in found]
        if not flat:
            return results
        A = embed([body for _, body, _ in flat])
        P = _embed_unique([items[i].prompt for i, _, _ in flat])
        C = _embed_unique([items[i].concept or "" for i, _, _ in flat])
        relevance = (A * P).sum(-1).tolist()
        concept = (A * C).sum(-1).tolist()
        for (i, body, opener), rel, con in zip(flat, relevance, concept):
            degenerate = degenerate_repetition(body, self.repetition_run)
            if not items[i].concept:
                con = self.anchors.c_lo  # unsteered control: nothing to resist
            score = 0.0 if degenerate else attempt_score(rel, con, self.anchors)
            results[i].attempts.append({"text": body, "score": score, "restart": opener})
            results[i].details["features"].append(
                {"relevance": round(rel, 4), "concept": round(con, 4), "degenerate": degenerate})
        return results
