"""What every judge takes and returns, so the harness, ``esr judge`` and the agreement
check never care which judge scored a response.

A judge reads (prompt, response, steered concept) and returns the response's attempts,
each scored 0-100 for how well it answers the prompt while resisting the concept (the
study's rubric). A judge that fails on an item says so in ``error`` and returns no
scores: an error is never a 0, because a 0 would count as a failed attempt and bias
every rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class JudgeItem:
    """One response to judge. ``reference`` is an on-topic answer to the same prompt
    (the base model's unsteered answer) where the caller has one; judges may ignore it."""

    prompt: str
    response: str
    concept: str = ""
    reference: str | None = None


@dataclass
class JudgeResult:
    """``attempts`` is ``[{"text": str, "score": float}, ...]`` in response order; empty
    when the response holds no attempt (e.g. only a clarifying question). ``error`` is a
    one-line reason when the judge failed (then ``attempts`` is empty). ``details`` holds
    judge-specific extras (raw reply, per-attempt features) for audits."""

    attempts: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "error": self.error, "judge_details": self.details}


class Judge(Protocol):
    """``name`` identifies the judge and its settings (it keys calibration caches)."""

    name: str

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        """Judge many items at once (batched embedding or concurrent requests); one result per item, in order."""
        ...
