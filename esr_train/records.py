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
