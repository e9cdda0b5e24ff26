"""``judge_file`` (output rows, counts, resume after a kill, bad input) and
``judge_agreement`` on a hand-computed example.

``RuleJudge`` is a real (tiny) implementation of our Judge protocol: a response
"20|90" has two attempts scored 20 and 90, "ERR" makes the judge fail on that item.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from eval.judge_files import JudgeFileError, format_agreement, judge_agreement, judge_file, read_judge_rows
from eval.judging import JudgeItem, JudgeResult


class RuleJudge:
    def __init__(self, name: str = "rule:v1") -> None:
        self.name = name
        self.seen: list[JudgeItem] = []

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        self.seen.extend(items)
        out = []
        for item in items:
            if item.response == "ERR":
                out.append(JudgeResult(error="judge failed"))
            else:
                parts = [p for p in item.response.split("|") if p]
                out.append(JudgeResult(attempts=[{"text": p, "score": float(p)} for p in parts],
                                       details={"concept": item.concept}))
        return out


INPUT = [
    {"prompt": "p0", "response": "80", "concept": "octopuses", "id": "a", "label": "steered"},
    {"prompt": "p1", "response": "20|90", "concept": "baking"},
    {"prompt": "p2", "response": "ERR", "concept": "jazz"},
    {"prompt": "p3", "response": "", "reference": "ref answer"},  # no concept, zero attempts
    {"prompt": "p4", "response": "50|40|70", "concept": "trains"},
]


def write_jsonl(path: Path, rows: list[dict], blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_judge_file_rows_and_counts(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", INPUT, blank_after=2)  # a blank line is skipped
    judge = RuleJudge()
    counts = judge_file(src, tmp_path / "out" / "judged.jsonl", judge, batch_size=2, progress=False)
    assert counts == {"rows": 5, "judged_now": 5, "errors": 1, "multi_attempt": 2}

    out = read_out(tmp_path / "out" / "judged.jsonl")
    assert [r["row"] for r in out] == [0, 1, 2, 3, 4]
    assert out[0] == {**INPUT[0], "row": 0, "attempts": [{"text": "80", "score": 80.0}], "error": None,
                      "judge_details": {"concept": "octopuses"}, "judge": "rule:v1", "n_attempts": 1}
    assert [r["n_attempts"] for r in out] == [1, 2, None, 0, 3]
    assert out[2]["error"] == "judge failed" and out[2]["attempts"] == []
    assert judge.seen[3] == JudgeItem(prompt="p3", response="", concept="", reference="ref answer")


def test_resume_after_kill(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", INPUT)
    full = tmp_path / "full.jsonl"
    judge_file(src, full, RuleJudge(), progress=False)
    expected = full.read_text()
    lines = expected.splitlines()

    # A killed run: rows 3 and 0 were appended (batches finish in any order), row 1 was cut mid-line.
    out = tmp_path / "out.jsonl"
    out.write_text(lines[3] + "\n" + lines[0] + "\n" + lines[1][:25])
    judge = RuleJudge()
    counts = judge_file(src, out, judge, batch_size=2, progress=False)
    assert [item.prompt for item in judge.seen] == ["p1", "p2", "p4"]
    assert counts["judged_now"] == 3 and counts["rows"] == 5
    assert out.read_text() == expected

    again = RuleJudge()
    assert judge_file(src, out, again, progress=False)["judged_now"] == 0 and again.seen == []
    retry = RuleJudge()
    assert judge_file(src, out, retry, progress=False, retry_errors=True)["judged_now"] == 1
    assert [item.prompt for item in retry.seen] == ["p2"] and out.read_text() == expected


def test_resume_refuses_foreign_output(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", INPUT)
    out = tmp_path / "out.jsonl"
    judge_file(src, out, RuleJudge(), progress=False)
    with pytest.raises(JudgeFileError, match=rf"^{re.escape(str(out))}:1: judged by 'rule:v1'"):
        judge_file(src, out, RuleJudge("rule:v2"), progress=False)
    other = write_jsonl(tmp_path / "other.jsonl", [{**INPUT[0], "prompt": "changed"}])
    with pytest.raises(JudgeFileError, match=rf"^{re.escape(str(out))}:1: existing output does not match input row 0"):
        judge_file(other, out, RuleJudge(), progress=False)


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "p", "response": ', "not valid JSON"),
    ('["p", "r"]', "expected a JSON object, got list"),
    ('{"response": "r"}', "'prompt' is missing or not a string"),
    ('{"prompt": "p", "response": 3}', "'response' is missing or not a string"),
    ('{"prompt": "p", "response": "r", "concept": ["x"]}', "'concept' is not a string"),
])
def test_bad_input_names_file_and_line(tmp_path: Path, line: str, words: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(INPUT[0]) + "\n\n" + line + "\n")
    with pytest.raises(JudgeFileError) as err:
        read_judge_rows(src)
    assert str(err.value).startswith(f"{src}:3: ") and words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError):  # JudgeFileError is a ValueError; judge_file fails before judging
        judge_file(src, tmp_path / "out.jsonl", RuleJudge(), progress=False)
    assert not (tmp_path / "out.jsonl").exists()


def test_non_utf8_and_binary_input_name_the_line(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(json.dumps(INPUT[0]).encode() + b'\n{"prompt": "caf\xe9", "response": "r"}\n')
    with pytest.raises(JudgeFileError, match=rf"^{re.escape(str(src))}:2: not UTF-8 text \(byte 16"):
        read_judge_rows(src)
    src.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00\xb0\x00\n")
    with pytest.raises(JudgeFileError, match=rf"^{re.escape(str(src))}:1: not UTF-8 text"):
        read_judge_rows(src)


def _row(i: int, scores: list[float] | None) -> dict:
    if scores is None:
        return {"row": i, "attempts": [], "error": "failed"}
    return {"row": i, "attempts": [{"text": "t", "score": s} for s in scores], "error": None}


def test_judge_agreement_hand_computed() -> None:
    a = {0: [80], 1: [20, 90], 2: [50, 40], 3: [70], 4: [90], 5: None, 6: [40], 7: [], 8: [60, 60]}
    b = {0: [85], 1: [30, 80], 2: [60, 70], 3: [10, 60], 4: [90], 5: [50], 6: None, 7: [], 8: [55, 55]}
    rows_a = [_row(i, s) for i, s in a.items()]
    rows_b = [_row(i, s) for i, s in reversed(b.items())]  # paired by "row", not position
    result = judge_agreement(rows_a, rows_b)
    # Paired rows (neither failed): 0 1 2 3 4 7 8 -> 7.  Multi-attempt a: 1 2 8 (3/7); b: 1 2 3 8 (4/7).
    # They disagree only on row 3: agreement 6/7.
    # kappa: po = 6/7; pe = (3/7)(4/7) + (4/7)(3/7) = 24/49; (42/49 - 24/49) / (25/49) = 18/25 = 0.72.
    # Both multi: rows 1 (+,+), 2 (-,+), 8 (0,0) -> direction agreement 2/3.
    # First scores (rows with an attempt on both sides: 0 1 2 3 4 8):
    #   x = 80 20 50 70 90 60, y = 85 30 60 10 90 55; |x - y| = 5 10 10 60 0 5 -> mean 15.
    #   mean x = 370/6, mean y = 55; sum dx*dy = 2150, sum dx^2 = 3083.33, sum dy^2 = 4800
    #   -> r = 2150 / sqrt(3083.33 * 4800) = 0.55887.
    assert result == {
        "n_paired": 7, "n_errors_a": 1, "n_errors_b": 1,
        "multi_attempt_agreement": pytest.approx(6 / 7),
        "multi_attempt_a": pytest.approx(3 / 7), "multi_attempt_b": pytest.approx(4 / 7),
        "cohen_kappa_multi_attempt": pytest.approx(0.72),
        "score_direction_agreement": pytest.approx(2 / 3), "n_both_multi": 3,
        "first_score_pearson": pytest.approx(0.55887, abs=1e-5),
        "mean_abs_first_score_diff": pytest.approx(15.0),
    }
    table = format_agreement(result)
    assert "85.7%" in table and "0.720" in table and "n_both_multi" in table


def test_judge_agreement_undefined_statistics() -> None:
    # No "row" keys: paired by position. Nobody is multi-attempt (kappa undefined), two
    # first-score pairs only (no correlation), no row where both are multi-attempt.
    rows = [{"attempts": [{"text": "t", "score": 50}], "error": None}] * 2
    result = judge_agreement(rows, rows)
    assert result["n_paired"] == 2 and result["multi_attempt_agreement"] == 1.0
    assert result["cohen_kappa_multi_attempt"] is None and result["score_direction_agreement"] is None
    assert result["first_score_pearson"] is None and result["mean_abs_first_score_diff"] == 0.0
    flat = judge_agreement(rows * 2, rows * 2)  # four pairs, zero variance
    assert flat["first_score_pearson"] is None
    empty = judge_agreement([], [])
    assert empty["n_paired"] == 0 and empty["multi_attempt_a"] is None and "n/a" in format_agreement(empty)


def test_empty_input_refused_unless_allowed(tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n  \n")
    with pytest.raises(JudgeFileError, match=rf"^{re.escape(str(src))}: no rows to judge"):
        judge_file(src, out, RuleJudge(), progress=False, allow_empty=False)
    assert not out.exists()
    counts = judge_file(src, out, RuleJudge(), progress=False, allow_empty=True)
    assert counts == {"rows": 0, "judged_now": 0, "errors": 0, "multi_attempt": 0} and out.read_text() == ""


def test_failed_rows_error_counts_and_names_the_first(tmp_path: Path) -> None:
    from esr_train.errors import EsrError
    from eval.judge_files import FailedRowsError, failed_rows_error

    src, out = write_jsonl(tmp_path / "in.jsonl", INPUT), tmp_path / "out.jsonl"
    counts = judge_file(src, out, RuleJudge(), progress=False)
    error = failed_rows_error(out, counts)
    assert isinstance(error, FailedRowsError) and isinstance(error, EsrError) and error.exit_code == 3
    assert str(error) == (f"1 of 5 rows failed (first error: judge failed); they are kept in {out} with their "
                          "errors; re-run with --retry-errors")
    clean = write_jsonl(tmp_path / "clean.jsonl", [r for r in INPUT if r["response"] != "ERR"])
    assert failed_rows_error(tmp_path / "clean_out.jsonl",
                             judge_file(clean, tmp_path / "clean_out.jsonl", RuleJudge(), progress=False)) is None
