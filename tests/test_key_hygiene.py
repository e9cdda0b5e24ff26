"""Key hygiene of the OpenAI-compatible client, against real local HTTP servers.

A key must reach only the configured origin (a redirect to another port drops the
``Authorization`` header, a same-origin redirect keeps it), never appear in stored or
raised error text (a server that echoes it is redacted to ``***``), credentials in a base
URL are refused with a message that does not repeat them, and a key sent over plain http
to a non-local host is warned about once per host.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from esr_train import chat_client
from esr_train.chat_client import (
    ChatClient,
    ChatClientConfig,
    ChatConfigError,
    ChatError,
    check_base_url,
    is_local_host,
    plain_http_key_host,
    public_url,
    warn_plain_http_key,
)
from esr_train.cli import main
from esr_train.errors import EsrError
from tests.local_server import send_json, serve

KEY = "sk-test-0123456789abcdefSECRET"
ENV = "ESR_TEST_HYGIENE_KEY"
MSGS = [{"role": "user", "content": "hi"}]


def ok_payload(content: str = "hello") -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


class Recorder:
    """What one server saw: (method, path, headers) per request."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    def handler(self, answer: Callable[[BaseHTTPRequestHandler], None]) -> type[BaseHTTPRequestHandler]:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length", 0) or 0)
                if length:
                    self.rfile.read(length)
                with recorder.lock:
                    recorder.seen.append((self.command, self.path, dict(self.headers.items())))
                answer(self)

            do_GET = do_POST = _handle

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def redirect_to(location: str, code: int = 307) -> Callable[[BaseHTTPRequestHandler], None]:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(code)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return answer


def client(url: str, **kw: Any) -> ChatClient:
    kw = {"api_key_env": ENV, "max_retries": 0, "backoff_s": 0.01, "timeout_s": 5, **kw}
    return ChatClient(ChatClientConfig(base_url=url, model="m", **kw))


# -- redirects ---------------------------------------------------------------------------

@pytest.mark.parametrize("code", [307, 302])
def test_redirect_to_another_port_drops_the_key(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    monkeypatch.setenv(ENV, KEY)
    first, second = Recorder(), Recorder()
    with serve(second.handler(lambda h: send_json(h, 200, ok_payload("from second"))), monkeypatch) as other, \
            serve(first.handler(redirect_to(f"{other}/v1/chat/completions", code)), monkeypatch) as base:
        content = client(f"{base}/v1").complete(MSGS)
    assert content == "from second"
    assert first.seen[0][2]["Authorization"] == f"Bearer {KEY}"  # the configured origin gets the key
    method, path, headers = second.seen[0]
    assert path == "/v1/chat/completions" and method == ("POST" if code == 307 else "GET")
    assert "Authorization" not in headers and KEY not in json.dumps(headers)


def test_same_origin_redirect_keeps_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)
    rec = Recorder()

    def answer(h: BaseHTTPRequestHandler) -> None:
        if h.path.startswith("/old/"):
            redirect_to("/v1/chat/completions", 308)(h)  # a relative Location: same origin
        else:
            send_json(h, 200, ok_payload())

    with serve(rec.handler(answer), monkeypatch) as base:
        assert client(f"{base}/old").complete(MSGS) == "hello"
    assert [(m, p) for m, p, _ in rec.seen] == [("POST", "/old/chat/completions"), ("POST", "/v1/chat/completions")]
    assert rec.seen[1][2]["Authorization"] == f"Bearer {KEY}"


# -- redaction ---------------------------------------------------------------------------

def echo_key(status: int) -> Callable[[BaseHTTPRequestHandler], None]:
    """An endpoint that echoes the bearer token it got, as some servers' 401s do."""
    def answer(h: BaseHTTPRequestHandler) -> None:
        token = h.headers.get("Authorization", "").removeprefix("Bearer ")
        send_json(h, status, {"error": {"message": f"Incorrect API key provided: {token}. Check it."}})
    return answer


def test_echoed_key_is_redacted_from_raised_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)
    with serve(Recorder().handler(echo_key(401)), monkeypatch) as base:
        c = client(f"{base}/v1")
        with pytest.raises(ChatError) as info:
            c.complete(MSGS)
        [(_, content, error)] = list(c.map([MSGS]))
    assert KEY not in str(info.value) and KEY not in info.value.reason
    assert "Incorrect API key provided: ***" in str(info.value)
    assert content is None and KEY not in error and "***" in error


def test_key_is_redacted_before_the_message_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """A malformed 200 shows the first 120 characters of the body; a key straddling that
    cut must not leave its first characters behind."""
    monkeypatch.setenv(ENV, KEY)

    def answer(h: BaseHTTPRequestHandler) -> None:
        body = ("x" * 100 + h.headers["Authorization"]).encode()
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    with serve(Recorder().handler(answer), monkeypatch) as base, \
            pytest.raises(ChatError, match="malformed response") as info:
        client(f"{base}/v1").complete(MSGS)
    assert KEY[:8] not in str(info.value) and "Bearer ***" in str(info.value)


def test_echoed_key_is_redacted_in_the_judged_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(ENV, KEY)
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "concept": "c"}) + "\n"
                           for i in range(3)), encoding="utf-8")
    out = tmp_path / "judged.jsonl"
    with serve(Recorder().handler(echo_key(401)), monkeypatch) as base:
        code = main(["judge", str(src), "--out", str(out), "--judge", "llm", "--judge-base-url", f"{base}/v1",
                     "--judge-model", "m", "--judge-api-key-env", ENV])
    captured = capsys.readouterr()
    text = out.read_text(encoding="utf-8")
    assert code == 3 and KEY not in text and KEY not in captured.out + captured.err
    rows = [json.loads(line) for line in text.splitlines()]
    assert all("Incorrect API key provided: ***" in r["error"] for r in rows)


def test_key_echoed_in_an_unparsable_judge_reply_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    from eval.judging import JudgeItem
    from eval.llm_judge import make_llm_judge

    monkeypatch.setenv(ENV, KEY)

    def answer(h: BaseHTTPRequestHandler) -> None:
        token = h.headers["Authorization"].removeprefix("Bearer ")
        send_json(h, 200, ok_payload(f'<json>{{"attempts": [{{"attempt_text": "a", "score": "{token}"}}]}}</json>'))

    with serve(Recorder().handler(answer), monkeypatch) as base:
        judge = make_llm_judge(f"{base}/v1", "m", api_key_env=ENV, max_retries=0)
        [result] = judge.judge([JudgeItem(prompt="p", response="r", concept="c")])
    assert result.error and "'***'" in result.error
    assert KEY not in json.dumps(result.to_record())


# -- credentials in the URL --------------------------------------------------------------

CRED_URL_PARTS = ("alice", "pw-very-secret")


def test_public_url_strips_credentials() -> None:
    assert public_url("https://alice:pw@host.example:8443/v1?x=1") == "https://host.example:8443/v1?x=1"
    assert public_url("https://alice@host/v1") == "https://host/v1"
    assert public_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert public_url("http://alice:pw@host:notaport/v1") == "http://host:notaport/v1"  # unparsable port


def test_credentials_in_the_base_url_are_refused_without_repeating_them(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    from eval.config import EvalConfig, EvalConfigError

    rec = Recorder()
    with serve(rec.handler(lambda h: send_json(h, 200, ok_payload())), monkeypatch) as base:
        url = base.replace("http://", "http://alice:pw-very-secret@") + "/v1"
        with pytest.raises(ChatConfigError) as info:
            client(url)
        assert isinstance(info.value, EsrError)
        message = str(info.value)
        assert f"{base}/v1" in message and ENV in message

        with pytest.raises(EvalConfigError) as cfg_info:  # before eval_config.json could store it
            EvalConfig(judge="llm", judge_base_url=url, judge_model="m")
        assert "eval.judge_base_url" in str(cfg_info.value)

        src = tmp_path / "rows.jsonl"
        src.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n", encoding="utf-8")
        out = tmp_path / "judged.jsonl"
        code = main(["judge", str(src), "--out", str(out), "--judge", "llm", "--judge-base-url", url,
                     "--judge-model", "m"])
        err = capsys.readouterr().err
    assert code == 1 and err.startswith("esr judge: error: ") and err.count("\n") == 1
    assert not out.exists() and rec.seen == []  # nothing was sent, nothing written
    for shown in (message, str(cfg_info.value), err):
        assert not any(part in shown for part in CRED_URL_PARTS)


def test_chat_error_never_shows_url_credentials() -> None:
    error = ChatError("https://alice:pw-very-secret@host/v1/chat/completions", 500, "boom")
    assert str(error) == "POST https://host/v1/chat/completions: HTTP 500: boom"


def test_check_base_url_accepts_plain_urls() -> None:
    for url in ("http://localhost:8000/v1", "https://api.example.com/v1", "http://[::1]:8000/v1"):
        check_base_url(url, ENV)


# -- plain http to a non-local host ------------------------------------------------------

def test_plain_http_decision() -> None:
    assert plain_http_key_host("http://judge.example.com/v1") == "judge.example.com"
    assert plain_http_key_host("http://10.0.0.5:8000/v1") == "10.0.0.5:8000"
    assert plain_http_key_host("https://judge.example.com/v1") is None
    for local in ("http://localhost:8000/v1", "http://127.0.0.1:8000/v1", "http://[::1]:8000/v1",
                  "http://LOCALHOST/v1"):
        assert plain_http_key_host(local) is None, local
    assert is_local_host("127.0.0.2") and is_local_host("0.0.0.0") and not is_local_host("example.com")


def test_plain_http_warning_fires_once_per_host(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(chat_client, "_warned_hosts", set())
    with caplog.at_level(logging.WARNING, logger="esr_train.chat_client"):
        assert warn_plain_http_key("http://judge.example.com/v1/chat/completions")
        assert not warn_plain_http_key("http://judge.example.com/v1/chat/completions")
        assert warn_plain_http_key("http://other.example.com/v1/chat/completions")
        assert not warn_plain_http_key("https://third.example.com/v1/chat/completions")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "judge.example.com" in messages[0] and "plain http" in messages[0]


def test_a_request_with_a_key_over_plain_http_warns(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """192.0.2.1 (TEST-NET-1) is reserved and never routed: the request fails at once or
    times out, but the warning comes before it is sent. Without a key: no warning."""
    monkeypatch.setattr(chat_client, "_warned_hosts", set())
    url = "http://192.0.2.1:9/v1"
    with caplog.at_level(logging.WARNING, logger="esr_train.chat_client"):
        monkeypatch.delenv(ENV, raising=False)
        with pytest.raises(ChatError):
            client(url, timeout_s=0.3).complete(MSGS)
        assert caplog.records == []
        monkeypatch.setenv(ENV, KEY)
        for _ in range(2):
            with pytest.raises(ChatError):
                client(url, timeout_s=0.3).complete(MSGS)
    assert [r.getMessage() for r in caplog.records] == [
        "sending the API key over plain http to 192.0.2.1:9: anyone on the network path can read it; use https"]


def test_no_plain_http_warning_for_localhost(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(chat_client, "_warned_hosts", set())
    monkeypatch.setenv(ENV, KEY)
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="esr_train.chat_client"), \
            serve(rec.handler(lambda h: send_json(h, 200, ok_payload())), monkeypatch) as base:
        assert client(f"{base}/v1").complete(MSGS) == "hello"
        assert client(base.replace("127.0.0.1", "localhost") + "/v1").complete(MSGS) == "hello"
    assert rec.seen[0][2]["Authorization"] == f"Bearer {KEY}" and caplog.records == []
