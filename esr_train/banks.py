"""Loaders for the input banks: task prompts, drift subjects and restart phrases.

Each bank is a JSONL file bundled in ``esr_train/resources``; the train/test
split is written in the file (not drawn at load time) so that held-out prompts
and subjects stay held out across runs and machines. Users may pass their own
file instead: plain text (one item per line) or JSONL (``.jsonl`` suffix).
Every problem with a bank raises :class:`BankError` with a one-line message
naming the file and line, because a bad bank should fail before any generation
starts, not halfway through it.
"""

from __future__ import annotations

from esr_train.errors import EsrError
import json
import string
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

SPLITS: tuple[str, ...] = ("train", "test")
"""Split names a bank row may carry."""

ALLOWED_PLACEHOLDERS: frozenset[str] = frozenset({"subject"})
"""The only ``{name}`` a restart phrase may contain (filled by :func:`format_restart`)."""


class BankError(EsrError, ValueError):
    """A bank file is missing, empty or malformed (one-line message with file and line)."""


@dataclass(frozen=True)
class _Bank:
    """How one bank file looks: its bundled name, main field and optional fields."""

    resource: str
    field: str
    noun: str
    str_fields: tuple[str, ...]
    list_fields: tuple[str, ...] = ()
    check_placeholders: bool = False


_PROMPTS = _Bank("prompts.jsonl", "prompt", "prompts", ("domain", "split"))
_SUBJECTS = _Bank("subjects.jsonl", "subject", "subjects", ("category", "split"), ("keywords",))
_PHRASES = _Bank(
    "restart_phrases.jsonl", "phrase", "restart phrases", ("style",), check_placeholders=True
)


def _placeholder_problem(text: str) -> str | None:
    """Return why ``text`` is not a valid restart template, or None if it is.

    Only ``{subject}`` may appear (``{{``/``}}`` are literal braces), so that
    :func:`format_restart` can never fail or leave a stray placeholder in a transcript.
    """
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        return f"bad braces ({exc})"
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in ALLOWED_PLACEHOLDERS or spec or conversion:
            return f"placeholder {{{name}}} not allowed (only {{subject}})"
    return None


def _check_split(split: str | None) -> None:
    """Reject split names other than train/test/None, naming the valid ones."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: 'train', 'test' or None (all)")


def _parse_row(line: str, where: str, bank: _Bank, jsonl: bool) -> dict[str, Any]:
    """Turn one non-blank line into a validated row dict."""
    if not jsonl:
        row: dict[str, Any] = {bank.field: line}
    else:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BankError(f"{where}: not valid JSON: {exc}") from None
        if not isinstance(row, dict):
            raise BankError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if bank.field not in row:
        raise BankError(f"{where}: missing field {bank.field!r}")
    for key in (bank.field, *bank.str_fields):
        optional_null = key != bank.field and row.get(key, "") is None
        if key in row and not optional_null and not isinstance(row[key], str):
            raise BankError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    for key in bank.list_fields:
        value = row.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BankError(f"{where}: field {key!r} must be a list of strings")
    row[bank.field] = row[bank.field].strip()
    if not row[bank.field]:
        raise BankError(f"{where}: empty {bank.field!r}")
    if row.get("split") is not None and row["split"] not in SPLITS:
        raise BankError(f"{where}: split must be 'train' or 'test', got {row['split']!r}")
    if bank.check_placeholders and (problem := _placeholder_problem(row[bank.field])):
        raise BankError(f"{where}: {problem}")
    return row


def _parse(text: str, label: str, bank: _Bank, jsonl: bool) -> list[dict[str, Any]]:
    """Parse a whole bank file; blank lines (and '#' lines in text files) are skipped."""
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        where = f"{label}:{lineno}"
        row = _parse_row(line, where, bank, jsonl)
        key = " ".join(row[bank.field].split()).casefold()
        if key in seen:
            raise BankError(
                f"{where}: duplicate {bank.field} (same as line {seen[key]}): {row[bank.field][:60]!r}"
            )
        seen[key] = lineno
        rows.append(row)
    if not rows:
        raise BankError(f"{label} has no {bank.noun}")
    return rows


def _load(bank: _Bank, path: str | Path | None) -> list[dict[str, Any]]:
    """Read the bundled bank (path None) or a user file, returning validated rows."""
    if path is None:
        resource = files("esr_train").joinpath("resources", bank.resource)
        label, jsonl = str(resource), True
        reader = resource.read_text
    else:
        p = Path(path)
        label, jsonl = str(p), p.suffix.lower() == ".jsonl"
        if not p.is_file():
            raise BankError(f"{label}: file not found")
        reader = p.read_text
    try:
        text = reader(encoding="utf-8")
    except FileNotFoundError:
        raise BankError(f"{label}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BankError(f"{label}: cannot read: {exc}") from None
    return _parse(text, label, bank, jsonl)


def _filter(rows: list[dict[str, Any]], split: str | None) -> list[dict[str, Any]]:
    """Keep rows of ``split``; rows with no (or null) split, as in user files, are always kept."""
    return [r for r in rows if split is None or r.get("split") in (None, split)]


def load_prompts(split: str | None = "train", path: str | Path | None = None) -> list[dict[str, Any]]:
    """Load task prompts ({"prompt", "domain", "split"}) of one split, or all with None.

    Training must only see train prompts so test prompts measure generalisation.
    ``path`` replaces the bundled bank; rows without a split are returned for any split.
    """
    _check_split(split)
    return _filter(_load(_PROMPTS, path), split)


def load_subjects(split: str | None = "train", path: str | Path | None = None) -> list[dict[str, Any]]:
    """Load drift subjects ({"subject", "category", "split", "keywords"}) of one split.

    ``keywords`` (lowercase) let later stages recognise text about the subject.
    Held-out subjects check that the model restarts on drifts it never saw.
    """
    _check_split(split)
    return _filter(_load(_SUBJECTS, path), split)


def load_restart_phrases(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Load restart phrases ({"phrase", "style"}); only {subject} placeholders are allowed.

    Many phrasings keep the model from memorising a single restart string.
    """
    return _load(_PHRASES, path)


def format_restart(phrase: dict[str, Any] | str, subject: str) -> str:
    """Fill ``{subject}`` in a restart phrase; phrases without it come back unchanged."""
    text = phrase["phrase"] if isinstance(phrase, dict) else phrase
    if problem := _placeholder_problem(text):
        raise BankError(f"restart phrase {text[:60]!r}: {problem}")
    return text.format(subject=subject)
