"""A judge against human labels: ``esr judge-agreement --labels``.

A labelled row is a judge input (``prompt``, ``response``, ``concept``) plus what a careful
reader found in it: ``attempts`` (each attempt's answer, an exact substring of the
response), ``restarts`` (the text announcing each restart, one fewer than the attempts),
``direction`` ("better", "worse" or "same": the last attempt against the first, for
multi-attempt rows; null otherwise) and ``source`` (where the response came from, e.g.
``hand:quoted`` or ``model:smollm2-135m:adapter:steered``). The set shipped with the
toolkit is ``eval/judge_set/`` (see its README for how it was labelled).

Agreement is reported per source, per source family (the part before the first colon)
and over all rows:

* multi-attempt: the judge and the label agree on whether there are two or more attempts;
* exact count: they agree on the number of attempts;
* direction: among rows both call multi-attempt, they agree on whether the last attempt
  beats the first (the event ESR counts; "same" and "worse" are both "no");
* false restarts: rows labelled as one attempt of an unsteered answer (empty concept) that
  the judge splits.

Rows the judge failed on are counted as errors and left out of every rate.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from esr_train.records import json_objects
from eval.judge_files import JudgeFileError

__all__ = ["DIRECTIONS", "label_agreement", "format_label_agreement", "read_labelled"]

DIRECTIONS = ("better", "worse", "same")


def _files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.glob("*.jsonl") if f.name != "heldout_restarts.jsonl")
            if not found:
                raise JudgeFileError(f"{p}: holds no labelled *.jsonl file")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise JudgeFileError(f"{p}: no such file or directory")
    return out


def read_labelled(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Labelled rows of JSONL files (a directory means its ``*.jsonl`` files, less the
    phrase list ``heldout_restarts.jsonl``), checked; a bad row raises
    :class:`JudgeFileError` naming ``file:line`` and the field."""
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for path in _files(paths):
        for lineno, row in json_objects(path, JudgeFileError):
            where = f"{path}:{lineno}"
            for key in ("id", "source", "prompt", "response"):
                if not isinstance(row.get(key), str) or not row[key]:
                    raise JudgeFileError(f"{where}: {key!r} is missing or not a non-empty string")
            if not isinstance(row.get("concept", ""), str):
                raise JudgeFileError(f"{where}: 'concept' is not a string")
            for key in ("attempts", "restarts"):
                if not isinstance(row.get(key), list) or not all(isinstance(t, str) for t in row[key]):
                    raise JudgeFileError(f"{where}: {key!r} must be a list of strings")
            n = len(row["attempts"])
            if len(row["restarts"]) != max(0, n - 1):
                raise JudgeFileError(f"{where}: 'restarts' must hold one fewer text than 'attempts' "
                                     f"({len(row['restarts'])} for {n})")
            pos = 0
            for key, text in _in_order(row):
                found = row["response"].find(text, pos)
                if found < 0:
                    raise JudgeFileError(f"{where}: {key} text {text[:40]!r} is not in the response "
                                         "after the text before it")
                pos = found + len(text)
            direction = row.get("direction")
            if (direction is None) != (n < 2) or (direction is not None and direction not in DIRECTIONS):
                raise JudgeFileError(f"{where}: 'direction' must be one of {DIRECTIONS} for a multi-attempt row "
                                     "and null otherwise")
            if row["id"] in seen:
                raise JudgeFileError(f"{where}: id {row['id']!r} repeats {seen[row['id']]}")
            seen[row["id"]] = where
            rows.append(row)
    if not rows:
        raise JudgeFileError(f"{', '.join(map(str, paths))}: no labelled rows")
    return rows


def _in_order(row: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for i, attempt in enumerate(row["attempts"]):
        if i:
            out.append(("restart", row["restarts"][i - 1]))
        out.append(("attempt", attempt))
    return out


def _judged_scores(judged: dict[str, Any]) -> list[float] | None:
    if judged.get("error") or not isinstance(judged.get("attempts"), list):
        return None
    return [float(a["score"]) for a in judged["attempts"]]


def _rate(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "rate": k / n if n else None}


def _agreement(pairs: Sequence[tuple[dict[str, Any], list[float]]], errors: int) -> dict[str, Any]:
    multi = sum((len(label["attempts"]) >= 2) == (len(scores) >= 2) for label, scores in pairs)
    exact = sum(len(label["attempts"]) == len(scores) for label, scores in pairs)
    both = [(label, scores) for label, scores in pairs if len(label["attempts"]) >= 2 and len(scores) >= 2]
    direction = sum((label["direction"] == "better") == (scores[-1] > scores[0]) for label, scores in both)
    normal = [(label, scores) for label, scores in pairs
              if len(label["attempts"]) == 1 and not label.get("concept")]
    labelled_multi = [(label, scores) for label, scores in pairs if len(label["attempts"]) >= 2]
    return {
        "n": len(pairs),
        "errors": errors,
        "multi_attempt": _rate(multi, len(pairs)),
        "exact_count": _rate(exact, len(pairs)),
        "direction": _rate(direction, len(both)),
        "recall": _rate(sum(len(s) >= 2 for _, s in labelled_multi), len(labelled_multi)),
        "false_restarts_unsteered": _rate(sum(len(s) >= 2 for _, s in normal), len(normal)),
    }


def label_agreement(labelled: Sequence[dict[str, Any]], judged: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Agreement of ``judged`` (rows of ``esr judge`` output, paired with ``labelled`` by
    position) with the labels, as ``{"all": ..., "by_family": {...}, "by_source": {...}}``."""
    if len(labelled) != len(judged):
        raise ValueError(f"{len(labelled)} labelled rows but {len(judged)} judged rows")
    groups: dict[str, dict[str, list]] = {"all": {}, "by_family": {}, "by_source": {}}
    for label, row in zip(labelled, judged):
        scores = _judged_scores(row)
        for kind, key in (("all", "all"), ("by_family", label["source"].split(":")[0]),
                          ("by_source", label["source"])):
            bucket = groups[kind].setdefault(key, {"pairs": [], "errors": 0})
            if scores is None:
                bucket["errors"] += 1
            else:
                bucket["pairs"].append((label, scores))
    out: dict[str, Any] = {}
    for kind, buckets in groups.items():
        result = {key: _agreement(b["pairs"], b["errors"]) for key, b in sorted(buckets.items())}
        out[kind] = result["all"] if kind == "all" else result
    return out


def _cell(r: dict[str, Any]) -> str:
    return "-" if r["rate"] is None else f"{100 * r['rate']:5.1f}% ({r['k']}/{r['n']})"


def format_label_agreement(result: dict[str, Any]) -> str:
    """A table: one line per source, per family and overall."""
    cols = ("multi_attempt", "exact_count", "direction", "recall", "false_restarts_unsteered")
    head = f"{'source':<44} {'n':>4} {'err':>3}  " + "  ".join(f"{c:<18}" for c in cols)
    lines = [head, "-" * len(head)]

    def line(name: str, r: dict[str, Any]) -> str:
        return f"{name:<44} {r['n']:>4} {r['errors']:>3}  " + "  ".join(f"{_cell(r[c]):<18}" for c in cols)

    for name, r in result["by_source"].items():
        lines.append(line(name, r))
    lines.append("-" * len(head))
    for name, r in result["by_family"].items():
        lines.append(line(f"{name} (all)", r))
    lines.append(line("all", result["all"]))
    return "\n".join(lines)
