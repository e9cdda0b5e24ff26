"""Append-only JSONL stores that make long runs resumable.

Each finished unit of work (a generated answer, a distraction, a judged trial) is
appended as one line ``{"key": ..., "value": ...}`` and flushed at once; a re-run loads
the file and skips keys already there. A line cut short by a crash is ignored (and
rewritten on the next save), so a kill never corrupts what was already written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from esr_train.errors import EsrError
from typing import Any, Iterator


class JsonlStore:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data: dict[str, Any] = {}
        good_bytes = 0
        if self.path.exists():
            raw = self.path.read_bytes()
            for line in raw.splitlines(keepends=True):
                try:
                    rec = json.loads(line)
                    self._data[rec["key"]] = rec["value"]
                except (ValueError, KeyError, TypeError):
                    break  # a torn last line: keep what came before it
                good_bytes += len(line)
            if good_bytes < len(raw):
                with open(self.path, "r+b") as fh:
                    fh.truncate(good_bytes)
                    if good_bytes and not raw[:good_bytes].endswith(b"\n"):
                        fh.seek(good_bytes)
                        fh.write(b"\n")

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def __len__(self) -> int:
        return len(self._data)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self._data.items())

    def put(self, key: str, value: Any) -> None:
        line = json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self._data[key] = value


class RecordError(EsrError, ValueError):
    """A stored record file with a bad line before its end."""


def parse_records(raw: bytes, path: Path, key_field: str = "key") -> tuple[dict[str, dict], int]:
    """The records of a :class:`RecordFile`'s bytes by key, and how many bytes hold whole
    records (a torn last line, left by a kill, is not counted); a bad line before the end
    raises :class:`RecordError` naming the file and line. Writes nothing."""
    records: dict[str, dict] = {}
    lines = raw.splitlines(keepends=True)
    good_bytes = 0
    for lineno, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
            key = rec[key_field]
        except (ValueError, KeyError, TypeError):
            if lineno == len(lines) and not line.endswith(b"\n"):
                break  # torn by a kill: the record is redone
            raise RecordError(f"{path}:{lineno}: not a JSON record with a {key_field!r} field; the "
                              "file was changed by hand or by another tool (fix or remove that line)") from None
        records[str(key)] = rec
        good_bytes += len(line)
    return records, good_bytes


class RecordFile:
    """A JSONL file of plain records (one object per line, each with a unique ``key_field``)
    that grows as work finishes: readable by any JSONL tool while a run is going, and
    resumable. A torn last line (a killed run) is dropped; a bad line anywhere else is an
    error naming the file and line, because silently skipping it would lose a record."""

    def __init__(self, path: str | os.PathLike, key_field: str = "key") -> None:
        self.path = Path(path)
        self.key_field = key_field
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict] = {}
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        self._records, good_bytes = parse_records(raw, self.path, key_field)
        if good_bytes < len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(good_bytes)
        if good_bytes and not raw[:good_bytes].endswith(b"\n"):
            with open(self.path, "ab") as fh:  # killed between a record and its newline
                fh.write(b"\n")

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[dict]:
        return list(self._records.values())

    def extend(self, records: list[dict]) -> None:
        """Append records (flushed and synced together) and remember them."""
        if not records:
            return
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        for r in records:
            self._records[str(r[self.key_field])] = r


def json_objects(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a user's JSONL file; a line that
    is not a JSON object raises ``error`` naming the file and line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(f"{path}:{lineno}: not UTF-8 text (byte {exc.start + 1} of the line); "
                            "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise error(f"{path}:{lineno}: not valid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
