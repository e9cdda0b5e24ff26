"""Fault injection: ``kill -9`` part way through, then the same command again.

For ``esr judge``, ``esr generate`` and ``esr eval`` the resumed output must be the output of
a run that was never stopped: nothing lost, nothing duplicated, nothing changed. The kill
points are drawn from a seeded generator, so a failure reproduces.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ESR = [sys.executable, "-m", "esr_train.cli"]


def _run(argv: list[str], cwd: Path) -> None:
    proc = subprocess.run(ESR + argv, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_when(argv: list[str], cwd: Path, ready, delay: float) -> bool:
    """Start ``esr argv``, wait until ``ready()`` holds, then ``delay`` seconds more, and
    SIGKILL it; returns whether it was still running when killed."""
    proc = subprocess.Popen(ESR + argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    running = proc.poll() is None
    if running:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return running


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _judge_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    topics = ["baking bread", "fixing a bike", "writing a cover letter", "planting tomatoes", "saving money"]
    drifts = ["the ocean", "volcanoes", "jazz music", "medieval castles"]
    rows = []
    for i in range(n):
        topic, drift = rng.choice(topics), rng.choice(drifts)
        answer = f"To start with {topic}, gather what you need and go step by step."
        if i % 3 == 0:
            answer = (f"{drift.capitalize()} are vast and full of wonder, stretching far beyond sight. "
                      f"Wait, that's not right. To answer your question about {topic}: {answer}")
        rows.append({"prompt": f"How do I get better at {topic}?", "response": answer, "concept": drift})
    return rows


@pytest.mark.parametrize("kill_seed", [1, 2])
def test_judge_killed_anywhere_resumes_to_the_same_file(tmp_path, kill_seed):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _judge_rows(400)), encoding="utf-8")
    _run(["judge", str(src), "--out", str(tmp_path / "whole.jsonl")], tmp_path)
    out = tmp_path / "killed.jsonl"
    delay = random.Random(kill_seed).uniform(0.0, 0.3)
    killed = _kill_when(["judge", str(src), "--out", str(out)], tmp_path, lambda: _lines(out) > 0, delay)
    done_before = _lines(out)
    _run(["judge", str(src), "--out", str(out)], tmp_path)
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert not killed or done_before < 400, "the kill landed after the run finished; the test proved nothing"


def test_generate_killed_anywhere_resumes_to_the_same_dataset(tmp_path):
    rows = [{"prompt": f"How do I do task {i}?", "distraction": f"Stars burn for a long time, number {i}.",
             "restart": "Wait, that's not right.", "answer": f"Do task {i} step by step.", "subject": "stars",
             "kind": "self_correction" if i % 2 else "normal"} for i in range(600)]
    for r in rows:
        if r["kind"] == "normal":
            r["distraction"] = r["restart"] = r["subject"] = ""
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = ["generate", "--data.backend", "template", "--data.template_file", str(src), "--out"]
    _run(argv + [str(tmp_path / "whole")], tmp_path)
    out = tmp_path / "killed"
    for seed in (1, 2):
        _kill_when(argv + [str(out)], tmp_path, lambda: True, random.Random(seed).uniform(1.0, 4.0))
    _run(argv + [str(out)], tmp_path)
    for name in ("train.jsonl", "test.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


@pytest.mark.slow
def test_eval_killed_anywhere_resumes_to_the_same_trials(tmp_path):
    """A real ``kill -9`` of ``esr eval`` on the bundled model while trials are being
    written; the resumed trials equal the uninterrupted run's but for their timing."""
    argv = ["eval", "--eval.n_prompts", "3", "--eval.n_directions", "2", "--eval.trials", "12",
            "--eval.unsteered_trials", "0", "--eval.max_new_tokens", "16", "--eval.strength", "0.6",
            "--eval.batch_size", "2", "--eval.capability", "false", "--eval.conditions", "base", "--no-report",
            "--out"]
    _run(argv + [str(tmp_path / "whole")], tmp_path)
    out = tmp_path / "killed"
    trials = out / "trials.jsonl"
    _kill_when(argv + [str(out)], tmp_path, lambda: _lines(trials) >= 4, random.Random(3).uniform(0.0, 0.5))
    _run(argv + [str(out)], tmp_path)

    def untimed(path: Path) -> list[dict]:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        return [{k: v for k, v in r.items() if k != "generate_s"} for r in records]

    assert untimed(trials) == untimed(tmp_path / "whole" / "trials.jsonl")
