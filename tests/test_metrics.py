"""Tests for eval.metrics against hand-worked values."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from esr_train.text import degenerate_repetition
from eval.metrics import (
    binomial_se,
    bootstrap_mean_interval,
    mean_se,
    summarize_trials,
    wilson_interval,
)


def trial(*scores: float | None) -> dict[str, Any]:
    return {"attempts": [{"text": f"attempt {i}", "score": s} for i, s in enumerate(scores)]}


# ------------------------------------------------------------------- wilson


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (0, 10, (0.0, 0.2775)),
        (5, 10, (0.2366, 0.7634)),
        (10, 10, (0.7225, 1.0)),
        (1, 20, (0.0089, 0.2361)),
    ],
)
def test_wilson_known_values(k: int, n: int, expected: tuple[float, float]) -> None:
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-4)
    assert hi == pytest.approx(expected[1], abs=1e-4)


def test_wilson_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_binomial_and_mean_se() -> None:
    assert binomial_se(5, 10) == pytest.approx(math.sqrt(0.25 / 10))
    assert binomial_se(0, 10) == 0.0
    assert math.isnan(binomial_se(0, 0))
    assert mean_se([10.0, 0.0]) == pytest.approx(math.sqrt(50.0) / math.sqrt(2))
    assert math.isnan(mean_se([1.0]))


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_is_deterministic_and_brackets_mean() -> None:
    values = [20.0, 30.0, 50.0, 10.0, 90.0, 45.0]
    a = bootstrap_mean_interval(values, seed=7)
    b = bootstrap_mean_interval(values, seed=7)
    assert a == b
    assert a[0] <= sum(values) / len(values) <= a[1]
    assert bootstrap_mean_interval(values, seed=8) != a
    narrow = bootstrap_mean_interval(values, alpha=0.5, seed=7)
    assert a[0] <= narrow[0] <= narrow[1] <= a[1]


def test_bootstrap_edges() -> None:
    lo, hi = bootstrap_mean_interval([])
    assert math.isnan(lo) and math.isnan(hi)
    assert bootstrap_mean_interval([42.0]) == (42.0, 42.0)
    assert bootstrap_mean_interval([5.0, 5.0, 5.0]) == (5.0, 5.0)


# ------------------------------------------------------------ summarize_trials


def test_summarize_hand_worked_example() -> None:
    s = summarize_trials([trial(20, 80), trial(30), trial(50, 40), trial(10)])
    assert s["n"] == 4
    assert s["n_errors"] == 0 and s["n_no_attempt"] == 0
    assert s["n_multi_attempt"] == 2 and s["n_esr"] == 1
    assert s["multi_attempt_rate"] == 0.5
    assert s["esr_rate"] == 0.25
    assert s["improvement_rate"] == 0.5
    assert s["mean_first_score"] == 27.5
    assert s["mean_last_score"] == 40.0  # (80 + 30 + 40 + 10) / 4
    # Protocol: mean (last - first) over multi-attempt trials = (60 + -10) / 2. (The brief's
    # "5.0" for this example matches no reading of the definition: over all n it is 12.5.)
    assert s["mean_delta"] == 25.0
    assert s["multi_attempt_se"] == pytest.approx(math.sqrt(0.25 / 4))
    assert s["esr_se"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    assert s["multi_attempt_ci"] == pytest.approx(list(wilson_interval(2, 4)))
    assert s["esr_ci"] == pytest.approx(list(wilson_interval(1, 4)))
    assert s["improvement_ci"] == pytest.approx(list(wilson_interval(1, 2)))
    # first scores 20, 30, 50, 10: sample sd = sqrt(875/3)
    assert s["mean_first_score_se"] == pytest.approx(math.sqrt(875 / 3) / 2)
    # deltas 60, -10: sample sd = sqrt(2450)
    assert s["mean_delta_se"] == pytest.approx(math.sqrt(2450) / math.sqrt(2))
    lo, hi = s["mean_first_score_ci"]
    assert 10 <= lo <= 27.5 <= hi <= 50
    lo, hi = s["mean_delta_ci"]
    assert -10 <= lo <= hi <= 60


def test_summarize_excludes_errors_and_no_attempt_trials() -> None:
    trials = [
        trial(20, 80),
        trial(30),
        trial(50, None),  # judge failed on one attempt -> error
        {"attempts": None},  # judge produced nothing -> error
        {"error": "timeout", "attempts": []},  # flagged -> error
        trial(),  # only a clarifying question -> no attempt
    ]
    s = summarize_trials(trials)
    assert s["n"] == 2
    assert s["n_errors"] == 3
    assert s["n_no_attempt"] == 1
    assert s["multi_attempt_rate"] == 0.5
    assert s["esr_rate"] == 0.5
    assert s["mean_first_score"] == 25.0


def test_summarize_without_multi_attempt_trials_is_none_safe() -> None:
    s = summarize_trials([trial(30), trial(60)])
    assert s["multi_attempt_rate"] == 0.0 and s["esr_rate"] == 0.0
    assert s["multi_attempt_ci"][0] == 0.0
    assert s["improvement_rate"] is None and s["improvement_ci"] is None
    assert s["mean_delta"] is None and s["mean_delta_ci"] is None and s["mean_delta_se"] is None
    json.dumps(s, allow_nan=False)


def test_summarize_empty_is_json_serialisable_without_nan() -> None:
    s = summarize_trials([])
    assert s["n"] == 0
    assert s["multi_attempt_rate"] is None and s["esr_ci"] is None
    assert s["mean_first_score"] is None and s["mean_first_score_ci"] is None
    json.dumps(s, allow_nan=False)


def test_summarize_has_all_protocol_keys() -> None:
    expected = {
        "n", "n_errors", "n_no_attempt", "multi_attempt_rate", "multi_attempt_ci", "multi_attempt_se",
        "esr_rate", "esr_ci", "esr_se", "improvement_rate", "improvement_ci", "mean_first_score",
        "mean_first_score_ci", "mean_first_score_se", "mean_last_score", "mean_delta", "mean_delta_ci",
        "mean_delta_se", "n_multi_attempt", "n_esr", "n_drift_restart", "drift_restart_rate", "drift_restart_ci",
        "drift_restart_se",
    }  # fmt: skip
    s = summarize_trials([trial(20, 80), trial(30)])
    assert set(s) == expected
    json.dumps(s, allow_nan=False)


def test_drift_restart_needs_a_drifted_first_attempt() -> None:
    # a restart after an on-topic opener (first 80) is a multi-attempt trial but no drift restart
    s = summarize_trials([trial(20, 80), trial(49.9, 30), trial(80, 90), trial(50, 60), trial(10)])
    assert (s["n_multi_attempt"], s["n_drift_restart"]) == (4, 2)
    assert s["drift_restart_rate"] == 2 / 5 and s["drift_restart_ci"][0] < 0.4 < s["drift_restart_ci"][1]


def test_equal_last_and_first_is_not_esr() -> None:
    s = summarize_trials([trial(40, 40), trial(40, 10, 41)])
    assert s["n_multi_attempt"] == 2
    assert s["n_esr"] == 1  # only last vs first matters, not the middle attempt
    assert s["mean_delta"] == 0.5


# ----------------------------------------------------------- degenerate text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the the the the the cat", True),
        ("Wait, wait. WAIT! wait wait", True),
        ("the the the the cat", False),
        ("the cat the cat the cat the cat the cat", False),
        ("", False),
        ("A normal sentence with no repetition at all.", False),
        ("no — no — no — no — no", True),
    ],
)
def test_degenerate_repetition(text: str, expected: bool) -> None:
    assert degenerate_repetition(text) is expected


def test_degenerate_repetition_custom_run() -> None:
    assert degenerate_repetition("go go go", run=3)
    assert not degenerate_repetition("go go go", run=4)
    with pytest.raises(ValueError):
        degenerate_repetition("x", run=0)
