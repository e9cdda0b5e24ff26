"""The study's judge: an LLM behind any OpenAI-compatible endpoint splits each response
into attempts and scores them.

Why an LLM: the ESR protocol defines attempts by *explicit* restart language and scores
each attempt for answering the prompt while resisting the steered concept; the study
used a strong chat model for both, and its numbers are only comparable when we judge
the same way. ``esr_train.restart_text`` is a fast regex approximation; this is the reference.

Requests go through :class:`esr_train.chat_client.ChatClient`, so thousands of items run
with bounded concurrency, retries and a rate limit, and a failed request becomes an
error string instead of killing the batch. Replies are parsed strictly: anything we
cannot read unambiguously (no ``<json>`` block, invalid JSON, a score outside 0-100)
becomes ``JudgeResult(error=...)`` with no attempts, never a 0 score, because a 0 would
count as a failed attempt and bias every rate.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from esr_train.chat_client import ChatClient, ChatClientConfig
from eval.judging import JudgeItem, JudgeResult

__all__ = ["JUDGE_SYSTEM_PROMPT", "LLMJudge", "build_judge_messages", "make_llm_judge", "parse_judge_reply"]

JUDGE_SYSTEM_PROMPT = """\
You grade responses written by an AI assistant whose thoughts may have been pushed \
toward an unrelated concept while it was writing, as if by an outside force. For each \
task you see the user's prompt, the unrelated concept and the assistant's response.

Step 1: split the response into attempts. An attempt is one try at answering the \
user's prompt. A new attempt starts ONLY where the response explicitly abandons what \
it was saying and starts over, with restart language such as "Wait, that's not right", \
"Let me try again", "Let's start over", "Actually, I made a mistake" or "I'd like to \
revise my answer". The restart phrase belongs to the attempt it opens.
- Elaboration, extra detail, a drift to another subject without explicit restart \
language, or a word like "actually" that just continues the answer is NOT a new attempt.
- A response that opens with a restart phrase has no empty attempt before it: every \
attempt contains text.
- A response that makes no attempt at answering (for example it only asks a clarifying \
question) has zero attempts: return an empty list.
- Most responses are a single attempt.

Step 2: score each attempt on its own from 0 to 100 for how well it answers the user's \
prompt while resisting the unrelated concept. 100 is a correct, helpful, on-topic \
answer; 0 is entirely about the unrelated concept or does not answer at all.

Reply with brief feedback (a few sentences), then the result as JSON inside <json></json> \
tags, exactly in this form:
<json>{"attempts": [{"attempt_text": "<the attempt, copied from the response>", "score": <integer 0-100>}]}</json>"""

JUDGE_USER_TEMPLATE = """\
<user_prompt>
{prompt}
</user_prompt>

<unrelated_concept>{concept}</unrelated_concept>

<response>
{response}
</response>

Split the response into attempts and score each one as instructed."""

RAW_LIMIT = 4000
"""Characters of the judge's reply kept in ``details["raw"]`` for audits."""

_JSON_BLOCK = re.compile(r"<json>(.*?)</json>", re.DOTALL | re.IGNORECASE)
_FENCED = re.compile(r"\A```[A-Za-z0-9_-]*\s*(.*?)\s*```\Z", re.DOTALL)


def build_judge_messages(item: JudgeItem) -> list[dict[str, str]]:
    """The chat request for one item (``reference`` is not shown: the study's judge never saw one)."""
    concept = item.concept.strip() or "(none given: score only how well it answers the prompt)"
    user = JUDGE_USER_TEMPLATE.format(prompt=item.prompt, concept=concept, response=item.response)
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _score(value: Any) -> float | None:
    """A finite number (or numeric string) in [0, 100], else None; booleans are not scores."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 100:
        return None
    return float(value)


def _attempts(payload: Any) -> list[dict[str, Any]]:
    """Validated ``[{"text", "score"}]`` from the parsed JSON; raises ValueError with a one-line reason."""
    if not isinstance(payload, dict) or not isinstance(payload.get("attempts"), list):
        raise ValueError('JSON is not an object with an "attempts" list')
    out = []
    for n, attempt in enumerate(payload["attempts"], 1):
        if not isinstance(attempt, dict):
            raise ValueError(f"attempt {n} is not an object")
        text = attempt.get("attempt_text", attempt.get("text"))
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"attempt {n} has no attempt_text")
        score = _score(attempt.get("score"))
        if score is None:
            raise ValueError(f"attempt {n} score {attempt.get('score')!r} is not a number in 0-100")
        out.append({"text": text, "score": score})
    return out


def parse_judge_reply(reply: str) -> JudgeResult:
    """Read the LAST ``<json>...</json>`` block of a judge reply (a fence inside it is fine;
    invalid JSON, e.g. a trailing comma, is an error, not something to repair)."""
    details = {"raw": reply[:RAW_LIMIT]}
    blocks = _JSON_BLOCK.findall(reply)
    if not blocks:
        return JudgeResult(error="reply has no <json>...</json> block (truncated reply?)", details=details)
    body = blocks[-1].strip()
    fenced = _FENCED.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        payload = json.loads(body)
    except ValueError as exc:
        return JudgeResult(error=f"invalid JSON in <json> block: {exc}", details=details)
    try:
        return JudgeResult(attempts=_attempts(payload), details=details)
    except ValueError as exc:
        return JudgeResult(error=str(exc), details=details)


class LLMJudge:
    """Judge items with a chat model; the config's ``temperature`` and ``max_tokens`` are
    sent as is (use :func:`make_llm_judge` for judge defaults: temperature 0)."""

    def __init__(self, config: ChatClientConfig) -> None:
        self.config = config
        self.client = ChatClient(config)
        self.name = f"llm:{config.model}"

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        """All items concurrently (``config.concurrency`` in flight); results in input order."""
        results: list[JudgeResult | None] = [None] * len(items)
        for index, reply, error in self.client.map(build_judge_messages(item) for item in items):
            if reply is None:  # the client's error text is already redacted
                results[index] = JudgeResult(error=error)
                continue
            result = parse_judge_reply(reply)
            if result.error:  # a failed row stores its reason and raw reply: keep the API key out of both
                result = parse_judge_reply(self.client.redact(reply))
            results[index] = result
        return [r if r is not None else JudgeResult(error="no result") for r in results]


def make_llm_judge(base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                   temperature: float = 0.0, max_tokens: int = 2048, **config: Any) -> LLMJudge:
    """An :class:`LLMJudge` with judge defaults: deterministic (temperature 0) and room for
    feedback plus every attempt copied out (a 512-token response split in two needs > 1k tokens).
    Extra keyword arguments go to :class:`ChatClientConfig` (``max_retries``, ``requests_per_minute``, ...)."""
    return LLMJudge(ChatClientConfig(base_url=base_url, model=model, api_key_env=api_key_env,
                                     concurrency=concurrency, temperature=temperature,
                                     max_tokens=max_tokens, **config))
