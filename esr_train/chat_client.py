"""A small client for any OpenAI-compatible chat-completions endpoint.

Data generation (the ``llm`` backend) and, later, the LLM judge send thousands of short
chat requests to whatever server the user runs: a local vLLM / llama.cpp / Ollama server
or a hosted API. This module keeps that dependency-free (``urllib`` + threads) and
handles what breaks long batch jobs: transient failures are retried with exponential
backoff and jitter (honouring ``Retry-After``), a shared rate limiter keeps all workers
under a requests-per-minute budget, and :meth:`ChatClient.map` turns every failure into
a one-line error string so one bad request never kills a batch.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Statuses worth retrying: rate limits and server-side trouble (other 5xx also retry)."""

MAX_RETRY_AFTER_S = 300.0
"""Cap on a server's ``Retry-After`` so a bogus header cannot stall a batch for hours."""


@dataclass
class ChatClientConfig:
    """Where to send requests and how hard to push the server.

    ``api_key_env`` names an environment variable read at call time (never stored), so
    keys stay out of configs and logs; when it is unset no ``Authorization`` header is
    sent, which local servers accept. ``max_retries`` counts retries after the first
    attempt. ``extra_body`` is merged into every request body (e.g. ``{"top_p": 0.9}``).
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    max_retries: int = 4
    backoff_s: float = 1.0
    requests_per_minute: float | None = None
    timeout_s: float = 60
    temperature: float = 0.7
    max_tokens: int = 1024
    extra_body: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/chat/completions"


class ChatError(RuntimeError):
    """A request that failed for good; the message is one line naming the URL and status.

    ``status`` is the HTTP status (None for connection errors and timeouts);
    ``retryable`` says whether the failure was transient (used by the retry loop).
    """

    def __init__(self, url: str, status: int | None, reason: str, retryable: bool = False,
                 retry_after: float | None = None) -> None:
        self.url, self.status, self.reason = url, status, _one_line(reason)
        self.retryable, self.retry_after = retryable, retry_after
        where = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"POST {url}: {where}: {self.reason}" if self.reason else f"POST {url}: {where}")


class RateLimiter:
    """Spaces requests evenly so all threads together stay under ``per_minute``.

    Each caller reserves the next free slot under a lock and sleeps outside it, so
    waiting threads never block each other's bookkeeping.
    """

    def __init__(self, per_minute: float) -> None:
        if per_minute <= 0:
            raise ValueError(f"requests_per_minute must be > 0, got {per_minute}")
        self.interval = 60.0 / per_minute
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


def _one_line(text: str, limit: int = 200) -> str:
    """Collapse whitespace and truncate, so errors fit on one log line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _retry_after(value: str | None) -> float | None:
    """Parse a ``Retry-After`` header (seconds or an HTTP date) into seconds to wait."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _error_reason(exc: urllib.error.HTTPError) -> str:
    """The server's own error message when it sends one (OpenAI-style JSON), else the reason."""
    try:
        body = exc.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        body = ""
    try:
        err = json.loads(body).get("error")
        detail = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        detail = body
    reason = str(exc.reason or "")
    return f"{reason}: {detail}" if detail and reason else str(detail or reason)


class ChatClient:
    """Sends chat-completions requests with retries, a rate limit and bounded concurrency."""

    def __init__(self, config: ChatClientConfig) -> None:
        if config.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {config.concurrency}")
        if config.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {config.max_retries}")
        self.config = config
        self._limiter = RateLimiter(config.requests_per_minute) if config.requests_per_minute else None
        self._opener = urllib.request.build_opener()

    def _body(self, messages: list[dict], overrides: dict[str, Any]) -> dict[str, Any]:
        """Request body: config defaults, then ``extra_body``, then per-call overrides (None drops a key)."""
        cfg = self.config
        body: dict[str, Any] = {"model": cfg.model, "messages": messages,
                                "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
        body.update(cfg.extra_body)
        body.update(overrides)
        return {k: v for k, v in body.items() if v is not None}

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.config.api_key_env, "") if self.config.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _attempt(self, data: bytes) -> str:
        """One HTTP round trip; raises :class:`ChatError` (marked retryable or not)."""
        url = self.config.url
        if self._limiter:
            self._limiter.acquire()
        request = urllib.request.Request(url, data=data, headers=self._headers(), method="POST")
        try:
            with self._opener.open(request, timeout=self.config.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            retry_after = _retry_after(exc.headers.get("Retry-After")) if status in (429, 503) else None
            raise ChatError(url, status, _error_reason(exc), retryable=status in RETRY_STATUSES or status >= 500,
                            retry_after=retry_after) from None
        except urllib.error.URLError as exc:
            raise ChatError(url, None, f"connection error: {exc.reason}", retryable=True) from None
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            raise ChatError(url, None, f"{type(exc).__name__}: {exc}", retryable=True) from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ChatError(url, 200, f"malformed response ({type(exc).__name__}): {raw[:120]!r}") from None
        if not isinstance(content, str):
            raise ChatError(url, 200, "response has no message content")
        return content

    def _delay(self, attempt: int, error: ChatError) -> float:
        """Seconds before retry number ``attempt + 1``: Retry-After if given, else backoff with jitter."""
        if error.retry_after is not None:
            return error.retry_after
        return self.config.backoff_s * (2 ** attempt) * random.uniform(0.5, 1.5)

    def complete(self, messages: list[dict], **overrides: Any) -> str:
        """Return ``choices[0].message.content`` for one request, retrying transient failures.

        Connection errors, timeouts, 429 and 5xx are retried up to ``max_retries`` times;
        any other 4xx means the request itself is wrong and fails at once.
        """
        data = json.dumps(self._body(messages, overrides)).encode("utf-8")
        for attempt in range(self.config.max_retries + 1):
            try:
                return self._attempt(data)
            except ChatError as exc:
                if not exc.retryable or attempt >= self.config.max_retries:
                    raise
                time.sleep(self._delay(attempt, exc))
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _safe_complete(self, messages: list[dict]) -> tuple[str | None, str | None]:
        try:
            return self.complete(messages), None
        except Exception as exc:  # map() must never raise: every failure becomes a string
            if isinstance(exc, ChatError):
                return None, str(exc)
            return None, _one_line(f"{type(exc).__name__}: {exc}")

    def map(self, requests: Iterable[list[dict]]) -> Iterator[tuple[int, str | None, str | None]]:
        """Run many requests, yielding ``(index, content, error)`` as each finishes.

        At most ``concurrency`` requests are in flight, and the input is consumed lazily
        (a few ahead), so a generator of a million prompts is fine. Exactly one of
        ``content`` / ``error`` is None. Closing the iterator early cancels pending work.
        """
        limit = self.config.concurrency
        pending: dict[Future, int] = {}
        source = enumerate(requests)
        exhausted = False
        pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="chat")
        try:
            while True:
                while not exhausted and len(pending) < 2 * limit:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                    else:
                        pending[pool.submit(self._safe_complete, item[1])] = item[0]
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    content, error = future.result()
                    yield index, content, error
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
