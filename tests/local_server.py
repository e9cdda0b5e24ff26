"""A local HTTP server on 127.0.0.1 for tests of clients that talk to OpenAI-compatible
endpoints: started on a free port in a daemon thread, always shut down."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from typing import Iterator

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@contextmanager
def serve(handler, monkeypatch, quiet: bool = False) -> Iterator[str]:
    """Serve ``handler`` and yield ``http://127.0.0.1:PORT``; proxies are unset so the
    client connects directly."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    if quiet:
        httpd.handle_error = lambda request, address: None  # type: ignore[method-assign]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def send_json(handler, status: int, payload) -> None:
    """Write ``payload`` as a JSON response from inside a ``BaseHTTPRequestHandler``."""
    import json

    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
