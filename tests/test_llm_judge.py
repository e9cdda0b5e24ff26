"""The LLM judge against a canned local endpoint.

The server answers by a case marker found in the judged prompt, so each item exercises
one kind of judge reply (well-formed, wrapped in prose and fenced, malformed JSON, a
score out of range, no tags) or one kind of transport trouble (a 500 then success, a
persistent 400, slow replies that finish out of order).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from eval.judging import JudgeItem
from eval.llm_judge import JUDGE_SYSTEM_PROMPT, LLMJudge, make_llm_judge, parse_judge_reply
from tests.local_server import send_json, serve

TWO = ('The first attempt drifts into octopuses; the second answers.\n'
       '<json>{"attempts": [{"attempt_text": "Octopuses have three hearts.", "score": 10}, '
       '{"attempt_text": "Wait, that\'s not right. Use sorted(xs).", "score": 92.5}]}</json>')
CANNED: dict[str, str] = {
    "CASE-two": TWO,
    # An example block in the feedback, then the real one fenced, then chatter: the LAST block counts.
    "CASE-fenced": ('The format is <json>{"attempts": []}</json> as asked.\nResult:\n<json>\n```json\n'
                    '{"attempts": [{"text": "Use sorted(xs).", "score": "85"}]}\n```\n</json>\nHope this helps.'),
    "CASE-malformed": '<json>{"attempts": [{"attempt_text": "Use sorted(xs).", "score": 50},]}</json>',
    "CASE-range": '<json>{"attempts": [{"attempt_text": "Use sorted(xs).", "score": 150}]}</json>',
    "CASE-notags": '{"attempts": [{"attempt_text": "Use sorted(xs).", "score": 80}]}',
    "CASE-none": 'Only a clarifying question. <json>{"attempts": []}</json>',
    "CASE-flaky": TWO,
}


class Server:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.hits: dict[str, int] = {}
        self.url = ""
        self.outage: int | None = None  # a status every request gets (a non-retryable one keeps tests fast)


def _reply(user: str, hits: int) -> tuple[int, str | None]:
    """(status, judge reply) for a request whose user message is ``user``; ``hits`` counts this case's requests."""
    order = re.search(r"ORDER-(\d+)", user)
    if order:
        i = int(order.group(1))
        time.sleep((10 - i) * 0.02)  # early items finish last
        return 200, f'<json>{{"attempts": [{{"attempt_text": "answer {i}", "score": {i}}}]}}</json>'
    if "CASE-flaky" in user and hits == 1:
        return 500, None
    key = next((k for k in CANNED if k in user), None)
    return (200, CANNED[key]) if key else (400, None)


def _handler(state: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            user = body["messages"][-1]["content"]
            match = re.search(r"(?:CASE|ORDER)-\w+", user)
            case = match.group(0) if match else ""
            with state.lock:
                state.bodies.append(body)
                state.hits[case] = state.hits.get(case, 0) + 1
                hits = state.hits[case]
            status, content = (state.outage, None) if state.outage else _reply(user, hits)
            payload = ({"choices": [{"message": {"role": "assistant", "content": content}}]} if status == 200
                       else {"error": {"message": f"canned {status}"}})
            send_json(self, status, payload)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    state = Server()
    with serve(_handler(state), monkeypatch) as base:
        state.url = f"{base}/v1"
        yield state


def make_judge(url: str) -> LLMJudge:
    return make_llm_judge(url, "judge-model", api_key_env="ESR_TEST_NO_KEY", concurrency=4,
                          max_retries=2, backoff_s=0.001)


def item(case: str, concept: str = "octopuses") -> JudgeItem:
    return JudgeItem(prompt=f"How do I sort a list in Python? {case}", response="Octopuses... Wait, that's not right.",
                     concept=concept)


def test_replies_parsed_or_reported(server: Server) -> None:
    cases = ["CASE-two", "CASE-fenced", "CASE-malformed", "CASE-range", "CASE-notags", "CASE-none"]
    judge = make_judge(server.url)
    assert judge.name == "llm:judge-model"
    two, fenced, malformed, out_of_range, notags, none = judge.judge([item(c) for c in cases])

    assert two.error is None
    assert two.attempts == [{"text": "Octopuses have three hearts.", "score": 10.0},
                            {"text": "Wait, that's not right. Use sorted(xs).", "score": 92.5}]
    assert two.details["raw"] == TWO
    assert fenced.error is None and fenced.attempts == [{"text": "Use sorted(xs).", "score": 85.0}]
    assert none.error is None and none.attempts == []

    for bad, words in [(malformed, "invalid JSON"), (out_of_range, "0-100"), (notags, "<json>")]:
        assert bad.attempts == [] and bad.error and words in bad.error and "\n" not in bad.error
        assert "raw" in bad.details


def test_retry_after_500_and_no_retry_on_400(server: Server) -> None:
    flaky, rejected = make_judge(server.url).judge([item("CASE-flaky"), item("CASE-unknown")])
    assert flaky.error is None and len(flaky.attempts) == 2
    assert server.hits["CASE-flaky"] == 2
    assert rejected.attempts == [] and rejected.error and "HTTP 400" in rejected.error
    assert server.hits["CASE-unknown"] == 1  # a 4xx is the request's fault: not retried


def test_results_keep_input_order(server: Server) -> None:
    results = make_judge(server.url).judge([item(f"ORDER-{i}") for i in range(10)])
    assert [r.attempts[0]["score"] for r in results] == [float(i) for i in range(10)]
    assert [r.attempts[0]["text"] for r in results] == [f"answer {i}" for i in range(10)]


def test_request_body(server: Server) -> None:
    make_judge(server.url).judge([item("CASE-two", concept="deep-sea octopuses")])
    (body,) = server.bodies
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    system, user = body["messages"]
    assert system == {"role": "system", "content": JUDGE_SYSTEM_PROMPT}
    assert "deep-sea octopuses" in user["content"]
    assert "How do I sort a list in Python? CASE-two" in user["content"]
    assert "Octopuses... Wait, that's not right." in user["content"]
    assert "Let me try again" in system["content"] and "<json>" in system["content"]


@pytest.mark.parametrize("reply, words", [
    ('<json>{"attempts": [{"attempt_text": "a", "score": NaN}]}</json>', "0-100"),
    ('<json>{"attempts": [{"attempt_text": "a", "score": true}]}</json>', "0-100"),
    ('<json>{"attempts": [{"attempt_text": "a", "score": "85/100"}]}</json>', "0-100"),
    ('<json>{"attempts": [{"attempt_text": "", "score": 50}]}</json>', "attempt_text"),
    ('<json>{"attempts": [{"score": 50}]}</json>', "attempt_text"),
    ('<json>[{"attempt_text": "a", "score": 50}]</json>', '"attempts"'),
    ('<json>{"attempts": ["a"]}</json>', "not an object"),
    ('feedback then <json>{"attempts": [{"attempt_text": "a", "sco', "<json>"),
])
def test_parse_rejects(reply: str, words: str) -> None:
    result = parse_judge_reply(reply)
    assert result.attempts == [] and result.error and words in result.error


def test_parse_accepts_edges() -> None:
    result = parse_judge_reply('<JSON>{"attempts": [{"attempt_text": "a", "score": " 0 "}, '
                               '{"attempt_text": "b", "score": 100}]}</JSON>')
    assert result.error is None and result.attempts == [{"text": "a", "score": 0.0}, {"text": "b", "score": 100.0}]
    assert parse_judge_reply("x" * 5000).details["raw"] == "x" * 4000


# -- esr judge: failed rows, --retry-errors, empty input -------------------------------------

def _rows(path: Path, cases: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"How do I sort a list? {c}", "response": "r", "concept": "c"})
                            + "\n" for c in cases), encoding="utf-8")
    return path


def _esr_judge(server: Server, src: Path, out: Path, *flags: str) -> int:
    from esr_train.cli import main

    return main(["judge", str(src), "--out", str(out), "--judge", "llm", "--judge-base-url", server.url,
                 "--judge-model", "judge-model", "--judge-api-key-env", "ESR_TEST_NO_KEY", *flags])


def test_cli_failed_rows_exit_3_then_retry_errors(server: Server, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    src, out = _rows(tmp_path / "rows.jsonl", ["CASE-two", "CASE-none", "CASE-two"]), tmp_path / "judged.jsonl"
    server.outage = 401
    assert _esr_judge(server, src, out) == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out)["errors"] == 3  # the counts are still printed ...
    assert [json.loads(line)["error"] is not None for line in out.read_text().splitlines()] == [True] * 3
    err = [line for line in captured.err.split("\n") if "error:" in line]  # (the rest is the progress bar)
    assert len(err) == 1 and captured.err.endswith(err[0] + "\n")  # ... and one last line says what failed
    err = err[0]
    assert err.startswith("esr judge: error: 3 of 3 rows failed (first error: POST ")
    assert "HTTP 401" in err and "--retry-errors" in err

    server.outage = None
    assert _esr_judge(server, src, out) == 3  # a plain re-run keeps the recorded errors
    assert json.loads(capsys.readouterr().out)["judged_now"] == 0
    assert _esr_judge(server, src, out, "--retry-errors") == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["judged_now"], printed["errors"], printed["multi_attempt"]) == (3, 0, 2)


def test_cli_empty_input_is_an_error_unless_allowed(server: Server, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "empty.jsonl", tmp_path / "judged.jsonl"
    src.write_text("\n\n", encoding="utf-8")
    assert _esr_judge(server, src, out) == 1
    err = capsys.readouterr().err
    assert err == f"esr judge: error: {src}: no rows to judge (the file is empty or only blank lines); " \
                  "pass --allow-empty to accept an empty input\n"
    assert not out.exists()
    assert _esr_judge(server, src, out, "--allow-empty") == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 0 and out.read_text() == ""


def test_cli_binary_input_names_file_and_line(server: Server, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "rows.bin", tmp_path / "judged.jsonl"
    src.write_bytes(b"\x7fELF\x02\x01\x01\x00\xb0\x00\n")
    assert _esr_judge(server, src, out) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"esr judge: error: {src}:1: not UTF-8 text") and err.count("\n") == 1
    assert not out.exists() and server.bodies == []


def test_cli_judge_arguments_have_help() -> None:
    from esr_train.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    judge = sub.choices["judge"]
    missing = [a.dest for a in judge._actions if a.dest != "help" and not a.help]
    assert missing == []
    assert {"retry_errors", "allow_empty"} <= {a.dest for a in judge._actions}
