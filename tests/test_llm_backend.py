"""The ``llm`` data_gen backend against a canned local endpoint.

The server answers by the task prompt found in the request, so each job exercises one
kind of reply: valid JSON, fenced JSON, a distraction cut mid-sentence, garbage, a
missing field, a normal row and an HTTP error.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from tests.local_server import send_json, serve

from data_gen.backends.llm import (
    LLM_SYSTEM_PROMPT,
    build_messages,
    generate_llm,
    parse_json_object,
    trim_to_sentence,
)
from esr_train.rows import Transcript
from esr_train.chat_client import ChatClient, ChatClientConfig

VALID = {"distraction": "To sort a list you can call sorted. Octopuses have three hearts and blue blood!",
         "restart": "Wait, that's not right, to answer your question:",
         "answer": "Use sorted(xs) for a new list or xs.sort() in place."}

CANNED: dict[str, str] = {
    "P-valid": json.dumps(VALID),
    "P-fenced": "Sure! Here it is:\n```json\n" + json.dumps(VALID) + "\n```\nHope that helps.",
    "P-cut": json.dumps({**VALID, "distraction": "Start with a plan. Octopuses can taste with their arms. And their"}),
    "P-nosentence": json.dumps({**VALID, "distraction": "Octopuses can taste with their"}),
    "P-garbage": "I'm sorry, I can't produce that.",
    "P-noanswer": json.dumps({"distraction": VALID["distraction"], "restart": VALID["restart"]}),
    "P-normal": '{"answer": "Paris is the capital of France."}',
}


class Canned:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.url = ""


def _handler(state: Canned) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            with state.lock:
                state.bodies.append(body)
            user = body["messages"][-1]["content"]
            key = next((k for k in CANNED if k in user), None)
            if key is None:
                status, payload = 400, {"error": {"message": "unknown prompt"}}
            else:
                status, payload = 200, {"choices": [{"message": {"role": "assistant", "content": CANNED[key]}}]}
            send_json(self, status, payload)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch) -> Iterator[Canned]:
    state = Canned()
    with serve(_handler(state), monkeypatch) as base:
        state.url = f"{base}/v1"
        yield state


def job(prompt: str, kind: str = "self_correction", seed: int = 1) -> dict[str, Any]:
    subject = "octopuses" if kind == "self_correction" else ""
    return {"prompt": prompt, "subject": subject, "kind": kind,
            "restart_hint": "Wait, I drifted into {subject}.", "seed": seed}


def run(url: str, jobs: list[dict]) -> dict[str, tuple[Transcript | None, str | None]]:
    client = ChatClient(ChatClientConfig(base_url=url, model="judge", api_key_env="ESR_TEST_NO_KEY",
                                         concurrency=3, max_retries=0, backoff_s=0.01))
    out = {j["prompt"]: (t, e) for j, t, e in generate_llm(jobs, client, model_label="big-teacher")}
    assert len(out) == len(jobs)
    for t, e in out.values():
        assert (t is None) != (e is None)
        if t is not None:
            assert t.backend == "llm" and t.model == "big-teacher"
            t.validate()
        else:
            assert e and "\n" not in e
    return out


def test_generate_llm_replies(canned: Canned) -> None:
    names = ["P-valid", "P-fenced", "P-cut", "P-nosentence", "P-garbage", "P-noanswer"]
    jobs = [job(n, seed=i) for i, n in enumerate(names)] + [job("P-normal", kind="normal", seed=99)]
    out = run(canned.url, jobs)

    valid, _ = out["P-valid"]
    assert valid is not None and valid.kind == "self_correction" and valid.subject == "octopuses"
    assert (valid.distraction, valid.restart, valid.answer) == (VALID["distraction"], VALID["restart"], VALID["answer"])
    assert valid.seed == 0 and valid.prompt == "P-valid"

    fenced, _ = out["P-fenced"]
    assert fenced is not None and fenced.answer == VALID["answer"] and fenced.seed == 1

    cut, _ = out["P-cut"]
    assert cut is not None and cut.distraction == "Start with a plan. Octopuses can taste with their arms."
    assert cut.extra.get("distraction_trimmed") is True

    assert out["P-nosentence"] == (None, "distraction has no complete sentence")
    assert out["P-garbage"][0] is None and "not JSON" in str(out["P-garbage"][1])
    assert out["P-noanswer"][0] is None and "'answer'" in str(out["P-noanswer"][1])

    normal, _ = out["P-normal"]
    assert normal is not None and normal.kind == "normal" and normal.seed == 99
    assert (normal.answer, normal.distraction, normal.restart, normal.subject) == \
        ("Paris is the capital of France.", "", "", "")
    assert normal.to_row()["messages"][1]["content"] == "Paris is the capital of France."


def test_request_failure_and_bad_job(canned: Canned) -> None:
    bad_kind = {**job("P-valid"), "prompt": "P-valid (bad kind)", "kind": "chaos"}
    out = run(canned.url, [job("P-unknown"), bad_kind])
    assert out["P-unknown"][0] is None and str(out["P-unknown"][1]).startswith("request failed:")
    assert "HTTP 400" in str(out["P-unknown"][1])
    assert out["P-valid (bad kind)"][0] is None and "kind" in str(out["P-valid (bad kind)"][1])
    assert len(canned.bodies) == 1  # the bad job never reached the server


def test_prompts_sent(canned: Canned) -> None:
    run(canned.url, [job("P-valid"), job("P-normal", kind="normal")])
    by_prompt = {b["messages"][-1]["content"].split("<<<\n")[1].split("\n>>>")[0]: b for b in canned.bodies}
    sc, normal = by_prompt["P-valid"]["messages"], by_prompt["P-normal"]["messages"]
    assert sc[0] == {"role": "system", "content": LLM_SYSTEM_PROMPT} and normal[0]["content"] == LLM_SYSTEM_PROMPT
    assert "octopuses" in sc[1]["content"] and "Wait, I drifted into octopuses." in sc[1]["content"]
    assert '"distraction"' in sc[1]["content"] and '"answer"' in sc[1]["content"]
    assert '{"answer": "..."}' in normal[1]["content"] and '"distraction"' not in normal[1]["content"]


def test_helpers() -> None:
    assert parse_json_object('```json\n{"a": "}{"}\n```') == {"a": "}{"}
    assert parse_json_object('noise {not json} then {"b": 1} {"c": 2}') == {"b": 1}
    assert parse_json_object("[1, 2]") is None
    assert trim_to_sentence('He said "stop." Then he') == 'He said "stop."'
    assert trim_to_sentence("Pi is 3.14 and") == ""
    assert trim_to_sentence("Done!") == "Done!"
    msgs = build_messages({**job("Q?"), "restart_hint": "Odd {brace"})  # unfillable hint is sent as is
    assert "Odd {brace" in msgs[1]["content"]
