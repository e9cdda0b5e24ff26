"""``esr judge-agreement --labels`` with an LLM judge: one command judges a labelled set
through an OpenAI-compatible endpoint (here a local one that answers from the labels, and
fails on one row) and reports agreement by source, with the failed row left out."""

from __future__ import annotations

import json
import re
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from esr_train.cli import main
from tests.local_server import send_json, serve

ROWS = [
    {"id": "r1", "source": "hand:a", "prompt": "How do I boil an egg?", "concept": "jazz",
     "response": "Jazz swings. Sorry, off track. Boil it for eight minutes.",
     "attempts": ["Jazz swings.", "Boil it for eight minutes."], "restarts": ["Sorry, off track."],
     "direction": "better"},
    {"id": "r2", "source": "hand:b", "prompt": "How do I boil an egg?", "concept": "",
     "response": "Boil it for eight minutes, then cool it in cold water.",
     "attempts": ["Boil it for eight minutes, then cool it in cold water."], "restarts": [], "direction": None},
    {"id": "r3", "source": "model:m:base:unsteered", "prompt": "FAIL How do I boil an egg?", "concept": "",
     "response": "Boil it.", "attempts": ["Boil it."], "restarts": [], "direction": None},
]


def _handler() -> type[BaseHTTPRequestHandler]:
    by_response = {r["response"]: r for r in ROWS}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            user = body["messages"][-1]["content"]
            if "FAIL" in user:
                send_json(self, 400, {"error": {"message": "canned 400"}})
                return
            row = by_response[re.search(r"<response>\n(.*)\n</response>", user, re.S).group(1)]
            attempts = [{"attempt_text": a, "score": 10 + 80 * i} for i, a in enumerate(row["attempts"])]
            reply = f'Split as labelled. <json>{json.dumps({"attempts": attempts})}</json>'
            send_json(self, 200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def test_llm_judge_against_labels_in_one_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    labels = tmp_path / "set.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "agreement"
    with serve(_handler(), monkeypatch) as base:
        rc = main(["judge-agreement", "--labels", str(labels), "--judge", "llm", "--judge-base-url", f"{base}/v1",
                   "--judge-model", "m", "--judge-api-key-env", "ESR_TEST_NO_KEY", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "agreement.json").read_text())
    assert result["judge"] == "llm:m"
    assert result["all"]["errors"] == 1 and result["all"]["n"] == 2
    assert result["all"]["multi_attempt"]["rate"] == 1.0 and result["all"]["direction"]["rate"] == 1.0
    assert set(result["by_source"]) == {"hand:a", "hand:b", "model:m:base:unsteered"}
    assert "hand:a" in capsys.readouterr().out


def test_bad_labelled_file_is_one_line(tmp_path: Path, capsys) -> None:
    labels = tmp_path / "set.jsonl"
    labels.write_text(json.dumps({**ROWS[0], "attempts": ["not there", "x"]}) + "\n")
    assert main(["judge-agreement", "--labels", str(labels), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("esr judge-agreement: error:") and f"{labels}:1:" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
