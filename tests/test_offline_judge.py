"""The offline judge on hand-written responses and on the study's released transcripts:
attempts are split at explicit restarts only, each scored for answering the prompt while
resisting the steered concept (real sentence embeddings, no mocks)."""

from __future__ import annotations

import json

import pytest

from esr_train.restart_text import split_attempts
from eval.judging import JudgeItem
from eval.offline_judge import Anchors, OfflineJudge, attempt_score

from .conftest import SHARED

TEA = "How do you make a cup of tea?"
TEA_ANSWER = ("Boil fresh water in a kettle. Put a tea bag in a cup, pour the hot water over it and let it steep "
              "for three to five minutes. Remove the bag and add milk or sugar if you like.")
VOLCANO_DRIFT = ("Volcanoes are fascinating: molten lava erupts from the crater and magma flows down the "
                 "mountain, while clouds of ash rise into the sky.")
CONCEPT = "volcanoes"


@pytest.fixture(scope="module")
def judge() -> OfflineJudge:
    return OfflineJudge()


def judged(judge: OfflineJudge, response: str, concept: str = CONCEPT, prompt: str = TEA):
    (result,) = judge.judge([JudgeItem(prompt, response, concept)])
    assert result.error is None
    assert len(result.details["features"]) == len(result.attempts)
    return result


def scores(result) -> list[float]:
    return [a["score"] for a in result.attempts]


def test_on_topic_answer_scores_high(judge) -> None:
    result = judged(judge, TEA_ANSWER)
    assert len(result.attempts) == 1 and result.attempts[0]["text"] == TEA_ANSWER
    assert scores(result)[0] > 70


def test_text_about_the_concept_scores_low(judge) -> None:
    result = judged(judge, "Volcanoes are openings in the Earth's crust where molten lava, ash and gases erupt. "
                           "Magma rises from deep below and explodes out of the crater.")
    assert len(result.attempts) == 1 and scores(result)[0] < 25


def test_degenerate_repetition_scores_zero(judge) -> None:
    result = judged(judge, "To make tea tea tea tea tea tea tea, boil the water.")
    assert scores(result) == [0.0]
    assert result.details["features"][0]["degenerate"] is True
    # the same words without the run of five are scored normally
    assert scores(judged(judge, "To make tea, boil the water and pour it over the tea bag."))[0] > 50


def test_elaboration_with_actually_stays_one_attempt(judge) -> None:
    response = ("Boil water in a kettle and pour it over a tea bag in your cup. Actually, the easiest way is to "
                "use a tea bag: steep it for three minutes, then remove it and add milk.")
    result = judged(judge, response)
    assert [a["text"] for a in result.attempts] == [response]
    assert scores(result)[0] > 70


def test_restart_at_the_start_has_no_empty_first_attempt(judge) -> None:
    response = "Wait, that's not right. To make tea, boil water, pour it over a tea bag in a cup and steep it."
    result = judged(judge, response)
    # nothing before it to abandon: the phrase stays in the one attempt (as the labelling rule has it)
    assert len(result.attempts) == 1 and result.attempts[0]["restart"] is None
    assert result.attempts[0]["text"] == response and scores(result)[0] > 70


def test_drift_then_restart_is_two_attempts_with_last_above_first(judge) -> None:
    answer = ("Wait, that's not right — to answer your question, boil water in a kettle, pour it over a tea bag "
              "in a cup, steep for three minutes and add milk if you like.")
    result = judged(judge, f"{VOLCANO_DRIFT} {answer}")
    # the announcement, with its "to answer your question", is kept apart from the answer
    assert [a["text"] for a in result.attempts] == [VOLCANO_DRIFT, answer[answer.index("boil"):]]
    assert [a["restart"] for a in result.attempts] == [None, "Wait, that's not right — to answer your question,"]
    first, last = scores(result)
    assert first < 25 and last > 70 and last > first


def test_failed_restart_that_stays_off_topic_scores_low(judge) -> None:
    response = (f"{VOLCANO_DRIFT} Wait, that's not right. Let me start over. Volcanoes erupt when the pressure of "
                "magma builds up under the crust, sending lava and ash high into the air.")
    result = judged(judge, response)
    assert len(result.attempts) == 2
    assert scores(result)[1] < 40
    assert result.details["features"][1]["concept"] > result.details["features"][1]["relevance"]


def test_unsteered_item_gets_no_concept_penalty(judge) -> None:
    # on topic, but naming the concept: penalised when steered toward it, not when unsteered
    response = "Making tea near a volcano: boil water, pour it on a tea bag, steep for three minutes."
    steered, unsteered = judge.judge([JudgeItem(TEA, response, CONCEPT), JudgeItem(TEA, response, "")])
    (fs,), (fu,) = steered.details["features"], unsteered.details["features"]
    assert fu["relevance"] == fs["relevance"]
    assert fu["concept"] == judge.anchors.c_lo and fs["concept"] > judge.anchors.c_lo + 0.1
    # (features are rounded to 4 places, the score is computed from the exact similarity)
    assert scores(unsteered)[0] == pytest.approx(attempt_score(fu["relevance"], judge.anchors.c_lo, judge.anchors),
                                                 abs=0.05)
    assert scores(unsteered)[0] > 70 and scores(unsteered)[0] > scores(steered)[0] + 20


def test_empty_response_and_empty_batch(judge) -> None:
    assert judge.judge([]) == []
    (result,) = judge.judge([JudgeItem(TEA, "   ", CONCEPT)])
    assert result.attempts == [] and result.error is None


def test_attempt_score_rule_and_anchor_validation() -> None:
    a = Anchors(r_lo=0.1, r_hi=0.7, c_lo=0.0, c_hi=0.4)
    assert attempt_score(0.7, 0.0, a) == 100.0
    assert attempt_score(0.4, 0.0, a) == 50.0
    assert attempt_score(0.4, 0.2, a) == 25.0
    assert attempt_score(0.05, 0.0, a) == 0.0 and attempt_score(0.9, 0.5, a) == 0.0  # clipped both ends
    with pytest.raises(ValueError, match="r_hi > r_lo"):
        Anchors(r_lo=0.5, r_hi=0.5)


REFERENCES = {
    TEA: TEA_ANSWER,
    "How do you change a flat tyre?": ("Loosen the wheel nuts, lift the car with the jack, take off the flat wheel, "
                                       "fit the spare tyre and tighten the nuts in a star pattern."),
    "Explain how to add two fractions.": ("Find a common denominator, rewrite both fractions with it, add the "
                                          "numerators and simplify the resulting fraction."),
    "How do you keep a houseplant healthy?": ("Water the plant when the top of the soil is dry, give it bright "
                                              "indirect light and feed it with fertiliser in spring."),
}


def test_calibrated_judge_measures_its_anchors(judge) -> None:
    cal = judge.calibrated(list(REFERENCES), list(REFERENCES.values()), [CONCEPT, "jazz music"])
    assert cal is not judge and cal.name != judge.name and cal.name.startswith("offline:minilm:")
    a = cal.anchors
    assert a.r_hi > a.r_lo + 0.15
    assert a.c_hi == judge.anchors.c_hi and a.c_lo <= a.c_hi - 0.1
    # deterministic: the same references give the same judge name (it keys calibration caches)
    assert judge.calibrated(list(REFERENCES), list(REFERENCES.values()), [CONCEPT, "jazz music"]).name == cal.name
    # r_hi is the references' median similarity to their own prompt, so about half of them
    # score ~100 under the calibrated judge (measured: 98.4, 100, 94.0 and 40.2 for the plant)
    results = cal.judge([JudgeItem(p, r, CONCEPT) for p, r in REFERENCES.items()])
    ref_scores = [r.attempts[0]["score"] for r in results]
    assert sum(s > 90 for s in ref_scores) >= 2 and min(ref_scores) > 30, ref_scores


def test_calibration_needs_enough_distinct_references(judge) -> None:
    prompts, refs = list(REFERENCES), list(REFERENCES.values())
    assert judge.calibrated(prompts[:2], refs[:2], [CONCEPT]) is judge
    assert judge.calibrated(prompts, [refs[0], refs[1], "", "  "], [CONCEPT]) is judge  # blanks do not count
    assert judge.calibrated(prompts, refs, []) is judge
    # references no closer to their own prompt than to the others: keep the defaults
    assert judge.calibrated(prompts, ["I would be glad to help you with that."] * 4, [CONCEPT]) is judge


def _transcripts() -> list[dict]:
    path = SHARED / "reference" / "esr-paper" / "transcripts.jsonl"
    if not path.is_file():
        pytest.skip(f"shared reference data not available at {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_study_transcripts_attempts_and_score_direction(judge) -> None:
    rows = _transcripts()
    # Multi-attempt detection (the judge's splitter) on every row. Measured: 918/918 agree.
    agree = sum((len(split_attempts(r["response"])) >= 2) == bool(r["self_correction"]) for r in rows)
    assert agree / len(rows) >= 0.98, agree

    # Judging all 918 rows is too slow for the test suite, so a fixed every-8th subsample (115 rows,
    # 48 self-corrections) is judged. No concept label is released with the transcripts,
    # so attempts are scored for relevance alone (concept "").
    sample = rows[::8]
    results = judge.judge([JudgeItem(r["prompt"], r["response"], "") for r in sample])
    for r, res in zip(sample, results):
        # the same attempts as the phrase splitter, less the announcement that opens each
        phrase_split = split_attempts(r["response"])
        assert len(res.attempts) == len(phrase_split)
        assert all(a["text"] in b.text for a, b in zip(res.attempts, phrase_split))
    agree_judged = sum((len(res.attempts) >= 2) == bool(r["self_correction"]) for r, res in zip(sample, results))
    assert agree_judged / len(sample) >= 0.95
    corrections = [res for r, res in zip(sample, results) if r["self_correction"]]
    improved = sum(len(res.attempts) >= 2 and res.attempts[-1]["score"] > res.attempts[0]["score"]
                   for res in corrections)
    # Measured: 48/48 on this subsample, 458/459 on every self-correction row (smallest
    # gain on the subsample +6 points, mean +83).
    assert len(corrections) >= 40 and improved / len(corrections) >= 0.95, (improved, len(corrections))
    # the answer the model restarts into is on topic; the drift it abandons is not
    assert sum(res.attempts[-1]["score"] for res in corrections) / len(corrections) > 60
    assert sum(res.attempts[0]["score"] for res in corrections) / len(corrections) < 30
