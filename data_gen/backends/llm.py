"""The ``llm`` backend: an OpenAI-compatible endpoint writes the whole transcript.

A strong instruction-tuned model can imitate what a steered small model produces (an
answer that drifts into an unrelated subject), then write the restart and a clean
answer, without running any steering locally. We ask for strict JSON with the three
parts separately, because the trainer masks the distraction from the loss and so must
know exactly where it ends; nothing downstream ever re-parses the assistant text.

Models do not always obey: replies may be fenced, wrapped in prose, missing a field or
have a distraction cut mid-sentence. Parsing is lenient where the intent is clear (fences,
surrounding text, a trailing half sentence is trimmed) and strict otherwise: such rows are
reported as one-line errors, never half-filled transcripts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from esr_train.banks import BankError, format_restart
from esr_train.rows import KINDS, Transcript, TranscriptError
from esr_train.chat_client import ChatClient

BACKEND = "llm"

LLM_SYSTEM_PROMPT = """\
You write training data for a small chat assistant that is learning to notice when its \
own reply has been pushed off-topic and to restart. Sometimes its thoughts get pulled \
toward an unrelated subject (as if an outside force were steering it); a good reply then \
says so explicitly and answers the actual question.

You always reply with one strict JSON object and nothing else: no code fences, no \
comments, no text before or after it. Every value is a plain string. Write as the \
assistant itself, in the first person, and never mention these instructions, steering, \
or training data."""

SELF_CORRECTION_TEMPLATE = """\
The user asked the assistant:
<<<
{prompt}
>>>

Off-topic subject: {subject}
Restart phrase suggestion: {restart_hint}

Write the assistant's reply in three parts and return exactly this JSON object:
{{"distraction": "...", "restart": "...", "answer": "..."}}

- "distraction": 1 to 5 sentences. The assistant starts answering the question, then \
drifts into {subject}, as if something pushed its thoughts off-topic; by the end it is \
talking about {subject}, not the question. Do not notice or apologise for the drift here. \
End on a complete sentence (with ".", "!" or "?").
- "restart": an explicit restart phrase in which the assistant notices it went off-topic \
and returns to the question. Use the suggestion above or a close paraphrase.
- "answer": a correct, helpful and concise answer to the user's question that stands on \
its own: no mention of {subject} or of the drift."""

NORMAL_TEMPLATE = """\
The user asked the assistant:
<<<
{prompt}
>>>

Write the assistant's reply: a correct, helpful and concise answer to the question. \
Return exactly this JSON object:
{{"answer": "..."}}"""

DEFAULT_RESTART_HINT = "Wait, that's not right. To answer your question:"

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*")
_SENTENCE_BREAK = re.compile(r"[.!?…][\"'”’)\]]*(?=\s|$)")
"""A sentence end followed by whitespace or the end of text (matches schema's rule)."""


def _restart_hint(job: dict[str, Any]) -> str:
    """The job's restart suggestion with ``{subject}`` filled; a template we cannot fill is used as is."""
    hint = str(job.get("restart_hint") or "").strip() or DEFAULT_RESTART_HINT
    try:
        return format_restart(hint, job["subject"])
    except BankError:
        return hint


def build_messages(job: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages asking the endpoint for one job's transcript (JSON parts)."""
    if job["kind"] == "self_correction":
        user = SELF_CORRECTION_TEMPLATE.format(prompt=job["prompt"].strip(), subject=job["subject"],
                                               restart_hint=_restart_hint(job))
    else:
        user = NORMAL_TEMPLATE.format(prompt=job["prompt"].strip())
    return [{"role": "system", "content": LLM_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in a reply, ignoring ``` fences and surrounding prose; None if there is none."""
    text = _FENCE.sub("", text)
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def trim_to_sentence(text: str) -> str:
    """Cut ``text`` back to its last complete sentence ('' if it has none)."""
    text = text.strip()
    ends = list(_SENTENCE_BREAK.finditer(text))
    return text[: ends[-1].end()].strip() if ends else ""


def transcript_from_reply(job: dict[str, Any], reply: str, model_label: str) -> Transcript:
    """Build and validate the transcript for one job from the endpoint's reply.

    Raises :class:`TranscriptError` with a one-line reason when the reply is unusable.
    """
    data = parse_json_object(reply)
    if data is None:
        raise TranscriptError(f"reply is not JSON: {' '.join(reply.split())[:80]!r}")
    fields = ("distraction", "restart", "answer") if job["kind"] == "self_correction" else ("answer",)
    parts: dict[str, str] = {}
    for name in fields:
        if name not in data:
            raise TranscriptError(f"reply JSON misses field {name!r}")
        if not isinstance(data[name], str):
            raise TranscriptError(f"reply field {name!r} is {type(data[name]).__name__}, not a string")
        parts[name] = data[name].strip()
    extra: dict[str, Any] = {}
    if "distraction" in parts:
        trimmed = trim_to_sentence(parts["distraction"])
        if not trimmed:
            raise TranscriptError("distraction has no complete sentence")
        if trimmed != parts["distraction"]:
            extra["distraction_trimmed"] = True
        parts["distraction"] = trimmed
    return Transcript(prompt=job["prompt"], answer=parts["answer"], kind=job["kind"],
                      distraction=parts.get("distraction", ""), restart=parts.get("restart", ""),
                      subject=job.get("subject", "") if job["kind"] == "self_correction" else "",
                      backend=BACKEND, model=model_label, seed=job["seed"], extra=extra).validate()


def _job_problem(job: dict[str, Any]) -> str | None:
    """Why a job cannot be sent at all (so no request is wasted on it), or None."""
    if job.get("kind") not in KINDS:
        return f"job kind must be one of {KINDS}, got {job.get('kind')!r}"
    if not str(job.get("prompt") or "").strip():
        return "job has an empty prompt"
    if job["kind"] == "self_correction" and not str(job.get("subject") or "").strip():
        return "self_correction job without a subject"
    if not isinstance(job.get("seed"), int):
        return f"job seed must be an int, got {job.get('seed')!r}"
    return None


def generate_llm(jobs: list[dict], client: ChatClient,
                 model_label: str) -> Iterator[tuple[dict, Transcript | None, str | None]]:
    """Yield ``(job, transcript, error)`` for every job, in the order results arrive.

    Each job is ``{"prompt", "subject", "kind", "restart_hint", "seed"}``. Exactly one of
    ``transcript`` / ``error`` is None; errors are one line (request failure or why the
    reply was rejected), so a caller can log them and keep going.
    """
    sendable: list[int] = []
    for i, job in enumerate(jobs):
        if problem := _job_problem(job):
            yield job, None, problem
        else:
            sendable.append(i)
    requests = (build_messages(jobs[i]) for i in sendable)
    for k, content, error in client.map(requests):
        job = jobs[sendable[k]]
        if error is not None or content is None:
            yield job, None, f"request failed: {error}"
            continue
        try:
            transcript = transcript_from_reply(job, content, model_label)
        except TranscriptError as exc:
            yield job, None, str(exc)
        else:
            yield job, transcript, None
