"""File-level judging behind ``esr judge`` and ``esr judge-agreement``.

Why: judging thousands of responses with a hosted model takes hours and can be killed
at any point, so ``judge_file`` appends each finished batch to the output (flushed) and
a re-run judges only the rows still missing; a line cut short by a kill is dropped.
The finished file is rewritten in input order, one output row per input row, so two
judges' outputs for the same input pair up by their ``row`` index.

``judge_agreement`` reproduces the study's judge cross-check (agreement on
multi-attempt detection and on the direction of the score change) so a cheaper or
local judge can be validated against a reference judge before it is trusted.
"""

from __future__ import annotations

from esr_train.errors import EsrError
import json
import math
import os
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from esr_train.cache import atomic_write_text
from esr_train.records import json_objects
from eval.judging import Judge, JudgeItem

__all__ = ["FailedRowsError", "JudgeFileError", "failed_rows_error", "format_agreement", "judge_agreement",
           "judge_file", "read_judge_rows"]


class JudgeFileError(EsrError, ValueError):
    """Bad judge input or output file; the message is one line naming ``file:line``."""


class FailedRowsError(EsrError):
    """A judging run finished with rows the judge failed on (they are in the output with
    their ``error``); exit code 3 tells scripts the output is complete but not all judged."""

    exit_code = 3


def failed_rows_error(out_path: str | os.PathLike, counts: dict[str, int],
                      retry_hint: str = "re-run with --retry-errors") -> FailedRowsError | None:
    """The error to report for a finished :func:`judge_file` run whose ``counts`` hold
    errors (None when none): how many rows failed, the first error and how to retry."""
    if not counts.get("errors"):
        return None
    first = ""
    with open(out_path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                error = json.loads(line).get("error")
            except (ValueError, AttributeError):
                continue
            if error:
                first = " ".join(str(error).split())
                break
    if len(first) > 200:
        first = first[:199] + "…"
    return FailedRowsError(f"{counts['errors']} of {counts['rows']} rows failed"
                           + (f" (first error: {first})" if first else "")
                           + f"; they are kept in {out_path} with their errors; {retry_hint}")


def _optional_str(row: dict[str, Any], key: str) -> bool:
    return row.get(key) is None or isinstance(row[key], str)


def read_judge_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows ``{"prompt", "response", "concept"?, "reference"?, ...}`` of a JSONL file; blank
    lines are skipped, extra keys (``id``, ``label``, ...) are kept."""
    if not Path(path).is_file():
        raise JudgeFileError(f"{path}: no such file")
    rows = []
    for lineno, row in json_objects(path, JudgeFileError):
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise JudgeFileError(f"{path}:{lineno}: {key!r} is missing or not a string")
        for key in ("concept", "reference"):
            if not _optional_str(row, key):
                raise JudgeFileError(f"{path}:{lineno}: {key!r} is not a string")
        rows.append(row)
    return rows


def _load_done(out_path: Path, rows: list[dict[str, Any]], judge_name: str) -> dict[int, dict[str, Any]]:
    """Rows already judged in ``out_path``, by row index. A torn last line (killed run) is
    ignored; a bad line elsewhere, or a row from another input or judge, is an error
    (resuming into it would silently mix data)."""
    if not out_path.exists():
        return {}
    lines = out_path.read_text(encoding="utf-8", errors="replace").splitlines()
    done: dict[int, dict[str, Any]] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if lineno == len(lines):
                break  # cut short by a kill: judged again
            raise JudgeFileError(f"{out_path}:{lineno}: invalid JSON in existing output") from None
        i = rec.get("row") if isinstance(rec, dict) else None
        if not isinstance(i, int) or not 0 <= i < len(rows):
            raise JudgeFileError(f"{out_path}:{lineno}: existing output row has no valid 'row' index")
        if (rec.get("prompt"), rec.get("response")) != (rows[i]["prompt"], rows[i]["response"]):
            raise JudgeFileError(f"{out_path}:{lineno}: existing output does not match input row {i}; "
                                 "use another output path")
        if rec.get("judge") != judge_name:
            raise JudgeFileError(f"{out_path}:{lineno}: judged by {rec.get('judge')!r}, not {judge_name!r}; "
                                 "use another output path")
        done[i] = rec
    return done


def _dump(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def judge_file(in_path: str | os.PathLike, out_path: str | os.PathLike, judge: Judge, batch_size: int = 32,
               progress: bool = True, retry_errors: bool = False, allow_empty: bool = True) -> dict[str, int]:
    """Judge every row of ``in_path`` into ``out_path`` (resumable; see module docstring).

    Each output row is the input row plus ``row`` (its index), ``attempts``
    (``[{"text", "score"}]``), ``error``, ``judge_details``, ``judge`` and ``n_attempts``
    (None for an error, so a failure never reads as zero attempts). ``retry_errors``
    judges again rows that a previous run recorded as errors (e.g. a server outage).
    ``allow_empty=False`` makes an input without rows a :class:`JudgeFileError` (nothing
    is written). Returns counts over the whole output: ``rows``, ``judged_now``,
    ``errors`` and ``multi_attempt`` (>= 2 attempts).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = read_judge_rows(in_path)
    if not rows and not allow_empty:
        raise JudgeFileError(f"{in_path}: no rows to judge (the file is empty or only blank lines); "
                             "pass --allow-empty to accept an empty input")
    out = Path(out_path)
    done = _load_done(out, rows, judge.name)
    if retry_errors:
        done = {i: r for i, r in done.items() if not r.get("error")}
    if out.exists():  # drop a torn line (and retried errors) before appending
        atomic_write_text(out, _dump([done[i] for i in sorted(done)]))
    todo = [i for i in range(len(rows)) if i not in done]

    bar = tqdm(total=len(rows), initial=len(done), desc=f"judge {judge.name}", unit="row", disable=not progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    with bar, open(out, "a", encoding="utf-8") as fh:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            items = [JudgeItem(prompt=rows[i]["prompt"], response=rows[i]["response"],
                               concept=rows[i].get("concept") or "", reference=rows[i].get("reference"))
                     for i in batch]
            results = judge.judge(items)
            if len(results) != len(batch):
                raise RuntimeError(f"judge {judge.name} returned {len(results)} results for {len(batch)} items")
            new = []
            for i, result in zip(batch, results):
                attempts = [] if result.error else result.attempts
                done[i] = {**rows[i], "row": i, **result.to_record(), "attempts": attempts, "judge": judge.name,
                           "n_attempts": None if result.error else len(attempts)}
                new.append(done[i])
            fh.write(_dump(new))
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(batch))

    final = [done[i] for i in range(len(rows))]
    atomic_write_text(out, _dump(final))
    return {"rows": len(final), "judged_now": len(todo),
            "errors": sum(1 for r in final if r.get("error")),
            "multi_attempt": sum(1 for r in final if not r.get("error") and (r.get("n_attempts") or 0) >= 2)}


def _scores(row: dict[str, Any]) -> list[float] | None:
    """Attempt scores of a usable row; None when the judge failed on it."""
    if row.get("error") or not isinstance(row.get("attempts"), list):
        return None
    return [float(a["score"]) for a in row["attempts"]]


def _keyed(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    if all(isinstance(r.get("row"), int) for r in rows):
        return {r["row"]: r for r in rows}
    return dict(enumerate(rows))


def _kappa(a: list[bool], b: list[bool]) -> float | None:
    """Cohen's kappa; None when undefined (both judges give one constant label)."""
    from sklearn.metrics import cohen_kappa_score  # lazy: only this command needs sklearn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kappa = float(cohen_kappa_score(a, b, labels=[False, True]))
    return None if math.isnan(kappa) else kappa


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def judge_agreement(rows_a: Sequence[dict[str, Any]], rows_b: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Agreement of two judges' outputs for the same input (rows paired by ``row``, else by position).

    Error counts are over the rows both files hold; every other number is over rows
    where neither judge failed. Undefined statistics are None.
    """
    a, b = _keyed(rows_a), _keyed(rows_b)
    shared = sorted(a.keys() & b.keys())
    pairs = [(sa, sb) for sa, sb in ((_scores(a[k]), _scores(b[k])) for k in shared)
             if sa is not None and sb is not None]
    multi_a = [len(sa) >= 2 for sa, _ in pairs]
    multi_b = [len(sb) >= 2 for _, sb in pairs]
    both_multi = [(sa, sb) for sa, sb in pairs if len(sa) >= 2 and len(sb) >= 2]
    firsts = [(sa[0], sb[0]) for sa, sb in pairs if sa and sb]
    n = len(pairs)

    pearson = None
    if len(firsts) >= 3:
        try:
            pearson = statistics.correlation([x for x, _ in firsts], [y for _, y in firsts])
        except statistics.StatisticsError:  # zero variance
            pearson = None
    return {
        "n_paired": n,
        "n_errors_a": sum(1 for k in shared if _scores(a[k]) is None),
        "n_errors_b": sum(1 for k in shared if _scores(b[k]) is None),
        "multi_attempt_agreement": sum(x == y for x, y in zip(multi_a, multi_b)) / n if n else None,
        "multi_attempt_a": sum(multi_a) / n if n else None,
        "multi_attempt_b": sum(multi_b) / n if n else None,
        "cohen_kappa_multi_attempt": _kappa(multi_a, multi_b) if n else None,
        "score_direction_agreement": (sum(_sign(sa[-1] - sa[0]) == _sign(sb[-1] - sb[0]) for sa, sb in both_multi)
                                      / len(both_multi)) if both_multi else None,
        "n_both_multi": len(both_multi),
        "first_score_pearson": pearson,
        "mean_abs_first_score_diff": statistics.fmean(abs(x - y) for x, y in firsts) if firsts else None,
    }


def format_agreement(result: dict[str, Any]) -> str:
    """A two-column table of :func:`judge_agreement`'s result (rates as percentages)."""
    rates = {"multi_attempt_agreement", "multi_attempt_a", "multi_attempt_b", "score_direction_agreement"}
    width = max(len(k) for k in result)
    lines = []
    for key, value in result.items():
        if value is None:
            text = "n/a"
        elif key in rates:
            text = f"{100 * value:.1f}%"
        elif isinstance(value, float):
            text = f"{value:.3f}"
        else:
            text = str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
