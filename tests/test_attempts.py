"""Tests for esr_train.restart_text: explicit-restart splitting (the ESR judge's rule)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from esr_train.restart_text import RESTART_PATTERNS, Attempt, find_restarts, has_restart, split_attempts


def texts(response: str) -> list[str]:
    return [a.text for a in split_attempts(response)]


def assert_offsets(response: str) -> None:
    for a in split_attempts(response):
        assert response[a.start : a.end] == a.text


# ---------------------------------------------------------------- basic cases


def test_empty_response_has_no_attempts() -> None:
    assert split_attempts("") == []
    assert split_attempts("  \n\t ") == []


def test_clean_single_answer() -> None:
    response = "The capital of France is Paris. It has been the capital since 987."
    assert split_attempts(response) == [Attempt(response, 0, len(response))]
    assert not has_restart(response)


def test_drift_then_restart_is_two_attempts_with_exact_split() -> None:
    drift = "The Eiffel Tower is a wrought-iron lattice tower built for the 1889 World's Fair."
    restart = "Wait, that's not right. Let me answer your question: to bake bread, mix flour, water, yeast and salt."
    response = f"{drift}\n\n{restart}"
    attempts = split_attempts(response)
    assert [a.text for a in attempts] == [drift, restart]
    assert attempts[0].start == 0 and attempts[0].end == len(drift)
    assert attempts[1].start == len(drift) + 2 and attempts[1].end == len(response)
    assert_offsets(response)


def test_three_attempts() -> None:
    response = (
        "Volcanoes form where magma reaches the surface. "
        "Wait, no, that's off track. Tectonic plates are also fascinating. "
        "Sorry, I got sidetracked again. Let me get back to your question: water boils at 100 C at sea level."
    )
    assert texts(response) == [
        "Volcanoes form where magma reaches the surface.",
        "Wait, no, that's off track. Tectonic plates are also fascinating.",
        "Sorry, I got sidetracked again. Let me get back to your question: water boils at 100 C at sea level.",
    ]
    assert_offsets(response)


def test_consecutive_interjections_with_content_between_are_separate_attempts() -> None:
    response = "It's Paris. Wait, no, it's Lyon. Wait, no, it's Paris."
    assert texts(response) == ["It's Paris.", "Wait, no, it's Lyon.", "Wait, no, it's Paris."]


def test_no_wait_interjection_splits() -> None:
    assert texts("It's Lyon. No, wait, it's Paris.") == ["It's Lyon.", "No, wait, it's Paris."]


def test_restart_phrases_in_one_breath_are_one_restart() -> None:
    response = (
        "Dolphins use echolocation to hunt.\n\n"
        "Wait, that's not what you asked about at all! Let me start over.\n\n"
        "To change a tire, loosen the lug nuts first."
    )
    attempts = texts(response)
    assert len(attempts) == 2
    assert attempts[1].startswith("Wait, that's not what you asked")
    assert attempts[1].endswith("loosen the lug nuts first.")
    assert len(find_restarts(response)) == 1


def test_restart_at_very_start_gives_one_attempt_with_the_answer() -> None:
    response = "Wait, that's not right. Let me start over: the answer is 42."
    assert texts(response) == [response]


def test_failed_restart_that_stays_off_topic_is_still_two_attempts() -> None:
    response = (
        "Jazz emerged in New Orleans in the early 20th century. "
        "Wait, that's not right. Let me answer your question: jazz musicians like Louis Armstrong "
        "improvised over blues chord progressions."
    )
    attempts = texts(response)
    assert len(attempts) == 2
    assert attempts[0] == "Jazz emerged in New Orleans in the early 20th century."
    assert attempts[1].startswith("Wait, that's not right.")


def test_em_dash_restart() -> None:
    response = (
        "To get to the bakery, walk past the Eiffel Tower — wait, that's not right, to answer your "
        "question, preheat the oven to 220 C."
    )
    assert texts(response) == [
        "To get to the bakery, walk past the Eiffel Tower",
        "wait, that's not right, to answer your question, preheat the oven to 220 C.",
    ]
    assert_offsets(response)


def test_markdown_wrapped_restart_keeps_its_markers() -> None:
    response = "Cats purr.\n\n**Wait, that's not right.** Bake at 220 C."
    assert texts(response) == ["Cats purr.", "**Wait, that's not right.** Bake at 220 C."]


@pytest.mark.parametrize(
    "restart",
    [
        "Wait, that's not right.",
        "Wait, no.",
        "Let me try again.",
        "Let's start over.",
        "Let me start over.",
        "I'll start over.",
        "Actually, I made a mistake.",
        "I'd like to revise my answer.",
        "Sorry, I got sidetracked.",
        "Sorry, I got distracted.",
        "I drifted into marine biology there.",
        "Hold on, that's off track.",
        "Hold on, that's off-topic.",
        "Oops, that's not what you asked.",
        "Scratch that.",
        "Back to your question:",
        "Let me get back to your question.",
        "That's not what you asked.",
        "Hmm, that doesn't make sense.",
        "No, wait — let me try again.",
        "I completely went off on a tangent there.",
        "Anyway, where was I?",
        "Wait, that\u2019s not quite right\u2026",
    ],
)
def test_restart_phrases_split(restart: str) -> None:
    response = f"Whales are the largest mammals on Earth. {restart} Bake the bread at 220 C."
    attempts = texts(response)
    assert attempts == ["Whales are the largest mammals on Earth.", f"{restart} Bake the bread at 220 C."]
    assert has_restart(response)


# -------------------------------------------------------------- hard negatives


@pytest.mark.parametrize(
    "response",
    [
        "Actually, the easiest way is to use a spoon. Stir gently.",
        "This is actually simple: mix everything in one bowl.",
        "Apply the glue and wait for 30 seconds before pressing.",
        "Press the pieces together. Wait until the glue dries completely.",
        "Take the cake out. Wait 10 minutes before slicing it.",
        "Roll the dough thin. If the dough tears, start over with a new piece.",
        "Restart the router. If it fails, try again after a minute.",
        "If step 3 fails, go back to step 2 and check the wiring.",
        "Start over with a fresh sheet. Try again if the fold slips.",
        "**Wait:** in 2-6 months you will have dark, crumbly compost.",
        "Wait, then add the flour slowly.",
        "Wait, no more than five minutes, then flip it.",
        "Let me know if you have any questions.",
        "Let me explain. First, mix the flour and water.",
        "I'll try again later if the store is closed.",
        "What am I doing wrong? Usually the oven is too cold.",
        "- Redirect off-topic discussions\n- Stay on track with the agenda",
        "In the play, the chef shouts \"wait, that's not right\" and the audience laughs.",
        "Many people think rice must be rinsed; actually, that's not always necessary.",
        "Should you slice it now? No, wait until it has cooled.",
        "Is the Earth flat? No, that's not correct: it is an oblate spheroid.",
    ],
)
def test_hard_negatives_do_not_split(response: str) -> None:
    assert texts(response) == [response]
    assert not has_restart(response)


def test_restart_patterns_are_exported() -> None:
    assert RESTART_PATTERNS
    assert all(hasattr(p, "match") for p in RESTART_PATTERNS)


def test_degenerate_repetition_does_not_blow_up() -> None:
    # Steered models can emit the same interjection hundreds of times; matching must stay fast.
    assert len(split_attempts("Wait... " * 2000)) == 1


# -------------------------------------------------- outside check (study data)


def _shared_dir() -> Path:
    env = os.environ.get("ESR_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def _transcripts() -> list[dict]:
    path = _shared_dir() / "reference" / "esr-paper" / "transcripts.jsonl"
    if not path.is_file():
        pytest.skip(f"shared reference data not available at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_agrees_with_study_self_correction_labels() -> None:
    tp = fp = fn = tn = 0
    for row in _transcripts():
        predicted = len(split_attempts(row["response"])) >= 2
        actual = bool(row["self_correction"])
        tp += predicted and actual
        fp += predicted and not actual
        fn += actual and not predicted
        tn += not predicted and not actual
    total = tp + fp + fn + tn
    accuracy = (tp + tn) / total
    print(f"transcripts.jsonl: n={total} tp={tp} fp={fp} fn={fn} tn={tn} accuracy={accuracy:.4f}")
    assert total > 0
    assert accuracy >= 0.95


def test_study_restarts_are_found_with_other_restart_phrases() -> None:
    # The study's transcripts nearly all open their restart with one phrase. Swapping it for
    # other restart language must still split them, so the patterns are not tuned to it.
    phrase = "Wait, that's not quite right..."
    rows = [r for r in _transcripts() if r["self_correction"] and r["response"].count(phrase) == 1]
    assert rows
    for replacement in ("Hold on, that's off track.", "Scratch that.", "Let me try again.", "No, wait."):
        found = sum(len(split_attempts(r["response"].replace(phrase, replacement))) == 2 for r in rows)
        assert found / len(rows) >= 0.95, replacement
