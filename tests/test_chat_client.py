"""ChatClient against a scripted local HTTP server: retries, errors, concurrency, rate limit.

The server runs on 127.0.0.1 (port 0) in a daemon thread; each test sets ``respond`` to
script the replies and reads back what the server saw (requests, headers, in-flight max).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from tests.local_server import serve

from esr_train.chat_client import ChatClient, ChatClientConfig, ChatError, RateLimiter

Reply = tuple[int, dict[str, str], Any]


def ok(content: str) -> Reply:
    return 200, {}, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


class FakeServer:
    """State shared with the handler threads; ``respond(n, body)`` gets the 1-based request number."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.respond: Callable[[int, dict], Reply] = lambda n, body: ok("hello")
        self.url = ""

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.bodies)


def _handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with state.lock:
                state.bodies.append(body)
                state.headers.append(dict(self.headers.items()))
                n = len(state.bodies)
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                time.sleep(state.delay)
                status, headers, payload = state.respond(n, body)
            finally:
                with state.lock:  # before answering, so a client's next request cannot overlap
                    state.in_flight -= 1
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (timeout test)
                pass

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    state = FakeServer()
    with serve(_handler(state), monkeypatch, quiet=True) as base:
        state.url = f"{base}/v1/"
        yield state


def client(url: str, **kw: Any) -> ChatClient:
    kw.setdefault("api_key_env", "ESR_TEST_CHAT_KEY")
    return ChatClient(ChatClientConfig(base_url=url, model="test-model", **kw))


MSGS = [{"role": "user", "content": "hi"}]


def test_happy_path_sends_body_and_key(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESR_TEST_CHAT_KEY", "sk-test")
    c = client(server.url, temperature=0.3, max_tokens=77, extra_body={"top_p": 0.9})
    assert c.complete(MSGS) == "hello"
    body, headers = server.bodies[0], server.headers[0]
    assert body == {"model": "test-model", "messages": MSGS, "temperature": 0.3, "max_tokens": 77, "top_p": 0.9}
    assert headers["Authorization"] == "Bearer sk-test"
    c.complete(MSGS, temperature=0.0, max_tokens=None)  # overrides win; None drops the key
    assert server.bodies[1]["temperature"] == 0.0 and "max_tokens" not in server.bodies[1]


def test_no_key_no_authorization_header(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ESR_TEST_CHAT_KEY", raising=False)
    assert client(server.url).complete(MSGS) == "hello"
    assert "Authorization" not in server.headers[0]


def test_429_retry_after_then_success(server: FakeServer) -> None:
    server.respond = lambda n, body: (429, {"Retry-After": "0"}, {"error": {"message": "slow down"}}) if n == 1 \
        else ok("finally")
    start = time.monotonic()
    assert client(server.url, backoff_s=5.0).complete(MSGS) == "finally"
    assert server.count == 2
    assert time.monotonic() - start < 2.0  # Retry-After: 0 beat the 5 s backoff


def test_500_exhausts_retries(server: FakeServer) -> None:
    server.respond = lambda n, body: (500, {}, {"error": {"message": "boom"}})
    c = client(server.url, max_retries=2, backoff_s=0.01)
    with pytest.raises(ChatError) as info:
        c.complete(MSGS)
    assert info.value.status == 500 and server.count == 3
    message = str(info.value)
    assert "\n" not in message and "HTTP 500" in message and server.url.rstrip("/") in message and "boom" in message
    results = list(c.map([MSGS]))
    assert len(results) == 1
    index, content, error = results[0]
    assert (index, content) == (0, None) and error and "HTTP 500" in error and "\n" not in error
    assert server.count == 6


def test_400_fails_without_retry(server: FakeServer) -> None:
    server.respond = lambda n, body: (400, {}, {"error": {"message": "bad model"}})
    with pytest.raises(ChatError) as info:
        client(server.url, backoff_s=0.01).complete(MSGS)
    assert info.value.status == 400 and "bad model" in str(info.value)
    assert server.count == 1


def test_malformed_200_fails_without_retry(server: FakeServer) -> None:
    server.respond = lambda n, body: (200, {}, "not json at all")
    with pytest.raises(ChatError, match="malformed response"):
        client(server.url, backoff_s=0.01).complete(MSGS)
    assert server.count == 1


def test_concurrency_bound_and_indices(server: FakeServer) -> None:
    server.delay = 0.1
    server.respond = lambda n, body: ok("re:" + body["messages"][0]["content"])
    requests = [[{"role": "user", "content": str(i)}] for i in range(6)]
    results = list(client(server.url, concurrency=2).map(iter(requests)))
    assert sorted(i for i, _, _ in results) == list(range(6))
    assert all(content == f"re:{i}" and error is None for i, content, error in results)
    assert server.max_in_flight == 2


def test_rate_limiter_spaces_requests(server: FakeServer) -> None:
    start = time.monotonic()
    results = list(client(server.url, concurrency=5, requests_per_minute=600).map([MSGS] * 5))
    assert time.monotonic() - start >= 0.38
    assert all(error is None for _, _, error in results)


def test_rate_limiter_unit() -> None:
    limiter = RateLimiter(1200)  # 0.05 s apart
    start = time.monotonic()
    for _ in range(4):
        limiter.acquire()
    assert 0.14 <= time.monotonic() - start < 1.0
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_timeout_is_retried_then_reported(server: FakeServer) -> None:
    server.delay = 0.5
    c = client(server.url, timeout_s=0.15, max_retries=1, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(ChatError) as info:
        c.complete(MSGS)
    assert info.value.status is None and "no response" in str(info.value)
    assert time.monotonic() - start < 3.0
    deadline = time.monotonic() + 2.0
    while server.count < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.count == 2


def test_connection_refused_is_bounded() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    c = client(f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_s=0.01, timeout_s=2)
    start = time.monotonic()
    with pytest.raises(ChatError) as info:
        c.complete(MSGS)
    assert info.value.status is None and f"127.0.0.1:{port}" in str(info.value)
    [(index, content, error)] = list(c.map([MSGS]))
    assert index == 0 and content is None and error and "connection" in error
    assert time.monotonic() - start < 10.0


def test_map_early_close_does_not_hang(server: FakeServer) -> None:
    server.delay = 0.05
    gen = client(server.url, concurrency=2).map([MSGS] * 50)
    first = next(gen)
    gen.close()
    assert first[2] is None
    time.sleep(0.3)
    assert server.count < 50  # the input was consumed lazily and pending work cancelled
