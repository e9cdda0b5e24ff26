"""A small client for any OpenAI-compatible chat-completions endpoint.

Data generation (the ``llm`` backend) and, later, the LLM judge send thousands of short
chat requests to whatever server the user runs: a local vLLM / llama.cpp / Ollama server
or a hosted API. This module keeps that dependency-free (``urllib`` + threads) and
handles what breaks long batch jobs: transient failures are retried with exponential
backoff and jitter (honouring ``Retry-After``), a shared rate limiter keeps all workers
under a requests-per-minute budget, and :meth:`ChatClient.map` turns every failure into
a one-line error string so one bad request never kills a batch.

Key hygiene: the API key comes from an environment variable at call time and is sent as
a Bearer token only to the configured origin (a redirect to another scheme, host or port
drops it); every error text is redacted (the key becomes ``***``) before it is raised or
returned; a base URL carrying ``user:password@`` is refused (:func:`check_base_url`), so
credentials never reach a config file, a judge name or an error; :func:`public_url` is
the one form of a URL to show or store; and sending a key over plain ``http`` to a
non-local host logs a warning once per host.
"""

from __future__ import annotations

from esr_train.errors import EsrError
import email.utils
import http.client
import ipaddress
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Statuses worth retrying: rate limits and server-side trouble (other 5xx also retry)."""

MAX_RETRY_AFTER_S = 300.0
"""Cap on a server's ``Retry-After`` so a bogus header cannot stall a batch for hours."""

REDACTED = "***"
"""What the API key is replaced with in error text."""

MIN_REDACT_LEN = 4
"""Keys shorter than this are not redacted (they are no secret, and replacing every "1"
in a message would make it unreadable)."""

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

log = logging.getLogger(__name__)


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


class ChatError(EsrError, RuntimeError):
    """A request that failed for good; the message is one line naming the URL and status.

    ``status`` is the HTTP status (None for connection errors and timeouts);
    ``retryable`` says whether the failure was transient (used by the retry loop).
    The URL is shown by :func:`public_url` and ``secret`` (the API key) is redacted from
    the whole message before it is cut to length, so no part of the key survives.
    """

    def __init__(self, url: str, status: int | None, reason: str, retryable: bool = False,
                 retry_after: float | None = None, secret: str | None = None) -> None:
        url = redact(public_url(url), secret)
        self.url, self.status, self.reason = url, status, _one_line(redact(str(reason), secret))
        self.retryable, self.retry_after = retryable, retry_after
        where = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"POST {url}: {where}: {self.reason}" if self.reason else f"POST {url}: {where}")


class ChatConfigError(EsrError, ValueError):
    """A bad client setting (e.g. credentials in the base URL); one line naming the setting."""


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***`` (secrets shorter
    than :data:`MIN_REDACT_LEN` are left alone)."""
    if secret and len(secret) >= MIN_REDACT_LEN:
        return text.replace(secret, REDACTED)
    return text


def _split(url: str) -> urllib.parse.SplitResult | None:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        return None
    return parts


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries ``user[:password]@`` before its host."""
    parts = _split(url)
    if parts is None:  # unparsable: judge by the raw authority
        return "@" in url.partition("://")[2].split("/", 1)[0]
    return "@" in parts.netloc


def public_url(url: str) -> str:
    """``url`` as it may be shown or stored: without ``user:password@``. Use it wherever a
    URL reaches a message, a log, a judge name or a file."""
    if not has_credentials(url):
        return url
    parts = _split(url)
    if parts is None:
        scheme, sep, rest = url.partition("://")
        authority, slash, path = rest.partition("/")
        return f"{scheme}{sep}{authority.rpartition('@')[2]}{slash}{path}"
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def check_base_url(url: str, api_key_env: str | None, what: str = "base URL",
                   error: type[Exception] = ChatConfigError) -> None:
    """Refuse a base URL with credentials in it (``https://user:pass@host/v1``): they would
    end up in configs and logs. The message shows the URL without them and names the fix."""
    if has_credentials(url):
        env = api_key_env or "OPENAI_API_KEY"
        raise error(f"{what}: {public_url(url)} has credentials in it (user:password@), which are refused "
                    f"so they are never stored or logged; remove them and put the API key in the "
                    f"environment variable {env} (sent as a Bearer token)")


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in."""
    parts = _split(url)
    if parts is None:
        return ("", url, None)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def is_local_host(host: str) -> bool:
    """localhost, 127.0.0.1 and ::1 (and the rest of the loopback ranges), and 0.0.0.0 / ::
    (as a destination they mean this machine; servers print them as their address)."""
    host = host.lower().strip("[]").rstrip(".")
    if host in LOCAL_HOSTS or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
        return address.is_loopback or address.is_unspecified
    except ValueError:
        return False


def plain_http_key_host(url: str) -> str | None:
    """The ``host[:port]`` a key sent to ``url`` would cross the network to in clear text
    (plain ``http`` to a non-local host), else None."""
    scheme, host, port = _origin(url)
    if scheme != "http" or is_local_host(host):
        return None
    return host if port in (None, 80) else f"{host}:{port}"


_warned_hosts: set[str] = set()
_warned_lock = threading.Lock()


def warn_plain_http_key(url: str) -> bool:
    """Log a warning (once per process per host) when a key is about to go over plain http
    to a non-local host; True when this call warned."""
    host = plain_http_key_host(url)
    if host is None:
        return False
    with _warned_lock:
        if host in _warned_hosts:
            return False
        _warned_hosts.add(host)
    log.warning("sending the API key over plain http to %s: anyone on the network path can read it; "
                "use https", host)
    return True


class KeySafeRedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, with two changes: the ``Authorization`` header is
    dropped when a redirect leads to another origin (scheme, host or port), so a server
    cannot forward the key to a third party; and a POST answered with 307/308 is sent
    again with the same method and body (urllib otherwise fails on it; RFC 9110 says the
    method must not change)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if code in (307, 308) and req.get_method() == "POST":
            new = urllib.request.Request(newurl.replace(" ", "%20"), data=req.data, headers=dict(req.headers),
                                         origin_req_host=req.origin_req_host, unverifiable=True, method="POST")
        else:
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


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
        check_base_url(config.base_url, config.api_key_env)
        self.config = config
        self._limiter = RateLimiter(config.requests_per_minute) if config.requests_per_minute else None
        self._opener = urllib.request.build_opener(KeySafeRedirectHandler)

    def _body(self, messages: list[dict], overrides: dict[str, Any]) -> dict[str, Any]:
        """Request body: config defaults, then ``extra_body``, then per-call overrides (None drops a key)."""
        cfg = self.config
        body: dict[str, Any] = {"model": cfg.model, "messages": messages,
                                "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
        body.update(cfg.extra_body)
        body.update(overrides)
        return {k: v for k, v in body.items() if v is not None}

    def api_key(self) -> str:
        """The key from ``api_key_env`` now ("" when unset); read per request, never stored."""
        return os.environ.get(self.config.api_key_env, "") if self.config.api_key_env else ""

    def redact(self, text: str) -> str:
        """``text`` with the current API key replaced by ``***``."""
        return redact(text, self.api_key())

    def _headers(self, key: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _attempt(self, data: bytes) -> str:
        """One HTTP round trip; raises :class:`ChatError` (marked retryable or not, key redacted)."""
        url = self.config.url
        key = self.api_key()
        if key:
            warn_plain_http_key(url)
        if self._limiter:
            self._limiter.acquire()
        request = urllib.request.Request(url, data=data, headers=self._headers(key), method="POST")
        try:
            with self._opener.open(request, timeout=self.config.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            retry_after = _retry_after(exc.headers.get("Retry-After")) if status in (429, 503) else None
            raise ChatError(url, status, _error_reason(exc), retryable=status in RETRY_STATUSES or status >= 500,
                            retry_after=retry_after, secret=key) from None
        except urllib.error.URLError as exc:
            raise ChatError(url, None, f"connection error: {exc.reason}", retryable=True, secret=key) from None
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            raise ChatError(url, None, f"{type(exc).__name__}: {exc}", retryable=True, secret=key) from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            shown = redact(raw.decode("utf-8", "replace"), key)[:120]  # redact before cutting
            raise ChatError(url, 200, f"malformed response ({type(exc).__name__}): {shown!r}", secret=key) from None
        if not isinstance(content, str):
            raise ChatError(url, 200, "response has no message content", secret=key)
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
            return None, _one_line(self.redact(f"{type(exc).__name__}: {exc}"))

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
