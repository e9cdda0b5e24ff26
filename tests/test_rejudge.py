"""``esr rejudge``: a finished run's trials judged again with today's offline judge, the old
judge's attempts kept beside, calibrated on the run's own references (real MiniLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esr_train.cli import main
from eval.rejudge import rejudge_run

PROMPTS = ["How do I make tomato soup?", "How can I sleep better?", "How do I start running?"]
REFERENCES = [
    "Soften an onion in oil, add tomatoes and stock, simmer for twenty minutes and blend until smooth.",
    "Go to bed at the same time each night, keep the room dark and cool, and avoid screens before sleep.",
    "Begin with short run-walk sessions three times a week and add a few minutes of running each week.",
]
DRIFT = "Glaciers creep down mountain valleys, grinding rock and carving fjords as they melt into the sea."


def _trial(i: int, response: str, steered: bool = True) -> dict:
    return {"key": f"base|{'steered' if steered else 'unsteered'}|p{i}|glaciers|0.3|0", "condition": "base",
            "steered": steered, "prompt_id": f"p{i}", "prompt": PROMPTS[i], "direction": "glaciers",
            "strength": 0.3 if steered else 0.0, "level": 1.0 if steered else None, "response": response,
            "attempts": [{"text": response, "score": 10.0}], "error": None, "judge": "offline:minilm:old"}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    trials = [
        # a paraphrased restart the old judge missed: one attempt then, two now
        _trial(0, f"{DRIFT} My thoughts slid off to ice there, forgive me. {REFERENCES[0]}"),
        _trial(1, DRIFT),
        _trial(2, REFERENCES[2], steered=False),
    ]
    (run / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))
    (run / "references.jsonl").write_text("".join(json.dumps({"key": p, "value": r}) + "\n"
                                                  for p, r in zip(PROMPTS, REFERENCES)))
    (run / "eval_config.json").write_text(json.dumps({"judge": "offline", "model": "smollm2-135m"}))
    (run / "summary.json").write_text(json.dumps({"config": {"conditions": ["base"], "directions_used": ["glaciers"],
                                                             "judge": "offline:minilm:old"},
                                                  "calibration": {"glaciers": {"strength": 0.3}}}))
    return run


def test_rejudge_counts_again_and_keeps_the_old(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "new"
    result = rejudge_run(run, out, progress=False)
    assert result["previous"]["base"]["steered"]["multi_attempt_rate"] == 0.0
    assert result["current"]["base"]["steered"]["multi_attempt_rate"] == 0.5
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["previous_attempts"] == [{"text": first["response"], "score": 10.0}]
    assert first["previous_judge"] == "offline:minilm:old" and first["judge"].startswith("offline:minilm:")
    assert [a["text"] for a in first["attempts"]] == [DRIFT, REFERENCES[0]]
    assert first["attempts"][1]["score"] > 70 > first["attempts"][0]["score"] + 30
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration"] == {"glaciers": {"strength": 0.3}}
    assert summary["conditions"]["base"]["unsteered"]["n"] == 1
    # a second call resumes: nothing judged again, the same result
    assert rejudge_run(run, out, progress=False) == result


def test_rejudge_refuses_bad_runs_in_one_line(run: Path, tmp_path: Path, capsys) -> None:
    assert main(["rejudge", str(run), "--out", str(run)]) == 1
    assert "must differ" in capsys.readouterr().err
    assert main(["rejudge", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("esr rejudge: error:") and "not an evaluation run" in err and "\n" not in err
    with open(run / "trials.jsonl", "a") as fh:
        fh.write("{torn\n")
    assert main(["rejudge", str(run), "--out", str(tmp_path / "o")]) == 1
    assert "trials.jsonl:4:" in capsys.readouterr().err
