"""A stdlib HTTP server on a loopback port the kernel picks, answering from a daemon thread: what a test
stands up as an identity provider's JWKS endpoint, an OTLP collector or a misbehaving upstream."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that writes no access log to the test's output."""

    def log_message(self, *args: Any) -> None:
        pass


class LoopbackHTTPServer:
    """Subclass it, build a handler class in ``start`` and hand it to ``serve``; ``stop`` shuts it down."""

    _server: ThreadingHTTPServer | None = None

    @property
    def origin(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
