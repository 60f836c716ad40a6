"""A stdlib HTTP server on a loopback port the kernel picks, answering from a daemon thread: what a test
stands up as an identity provider's JWKS endpoint, an OTLP collector or a misbehaving upstream. And its twin for
an aiohttp application (an upstream that streams at its own pace), on an event loop of its own in a thread."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from aiohttp import web


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


class AiohttpThreadServer:
    """``app`` served on ``host`` (at ``port``, or one the kernel picks) by an event loop of its own in a daemon
    thread, started by ``start`` (or ``with``); ``stop`` cleans the application up, ends the thread and closes the
    loop, which the servers written before this one left open (a ResourceWarning once collected, in whatever test
    ran then). ``runner_options`` go to aiohttp's ``AppRunner`` (``access_log=None``: no access log)."""

    def __init__(self, app: web.Application, *, host: str = "127.0.0.1", port: int = 0, **runner_options: Any):
        self.host, self.port = host, port
        self._runner = web.AppRunner(app, **runner_options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = self._loop = asyncio.new_event_loop()

        async def boot() -> None:
            await self._runner.setup()
            await web.TCPSite(self._runner, self.host, self.port).start()
            self.port = self._runner.addresses[0][1]

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(boot())
            except BaseException as exc:  # handed to the thread that called start()
                failure.append(exc)
                loop.run_until_complete(self._runner.cleanup())
                return
            finally:
                ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="aiohttp-test-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            loop.close()
            raise failure[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
