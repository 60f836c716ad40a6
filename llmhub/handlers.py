"""A lean ASGI handler for the OpenAI-compatible API (``/v1/``).

Django's async request path is costly where it meets sync code: every ``MiddlewareMixin`` middleware
runs its ``process_request`` and ``process_response`` through ``sync_to_async(thread_sensitive=True)``
(two thread hops each, fourteen for our stack), and ``ASGIHandler`` wraps each request in a
``ThreadSensitiveContext``, which starts a fresh executor thread for the request's first such hop.
The /v1 views need none of the middleware: they authenticate with gateway keys (no session, no CSRF,
no messages), answer JSON (no clickjacking header), and check the Host header themselves. So
requests under the configured prefixes go to this handler, which

- has no middleware chain (the view's own exceptions still become responses, as in Django), and
- runs without a per-request ``ThreadSensitiveContext``: thread-sensitive hops (the async ORM's, and
  Django's ``request_finished`` receivers) share one long-lived thread instead of starting one per
  request, and
- does not send ``request_started``. Its receivers are Django's ``close_old_connections`` and
  ``reset_queries``, sync functions, so sending it costs a hop to that thread and back before the view
  can start: 0.24 ms of every request's latency and time to first token, measured in-process
  (``bench/``). ``request_finished`` is still sent after the response, and it runs the same
  ``close_old_connections`` on the same thread, so the database connections this handler's requests
  use are still checked (errors, ``CONN_MAX_AGE``, health-check reset) once per request, only after it
  rather than before. No receiver of ``request_started`` of our own or of an installed app depends on
  it for /v1 (a test pins the receivers).

Everything else (pages, admin, /api/) keeps the full Django stack.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from asgiref.sync import sync_to_async
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.urls import set_script_prefix


class MiddlewareFreeASGIHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        handler = self._get_response_async if is_async else self._get_response
        self._middleware_chain = convert_exception_to_response(handler)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Django 5.2's ``ASGIHandler.handle`` without ``request_started`` (see the module's docstring);
        everything else, the disconnect watch included, is Django's own."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            await sync_to_async(error_response.close)()
            return

        async def process_request() -> Any:
            response = await self.run_get_response(request)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # the client went away while the response was being sent
            return response

        # The disconnect watch first: it raises nothing unexpected that would keep the view from being
        # cancelled (Django's order and reasoning).
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request()),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            await signals.request_finished.asend(sender=self.__class__)
        else:
            await sync_to_async(response.close)()
        body_file.close()


# What the full stack's views implement, TRACE excepted: a 405 must say what is allowed (RFC 9110, 15.5.6).
_ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
_TRACE_REFUSED = json.dumps(
    {
        "error": {
            "message": "Method not allowed (TRACE).",
            "type": "invalid_request_error",
            "param": None,
            "code": "method_not_allowed",
        }
    }
).encode()


class PathPrefixRouter:
    """HTTP requests whose path starts with one of ``prefixes`` go to ``lean``, all others to ``full``.

    ``TRACE`` is refused here for every path of ``full`` (a view that does not check its method would
    otherwise echo the request, a cross-site tracing vector); ``lean``'s views refuse it themselves, in
    OpenAI's error shape and with a ledger row for the key that sent it."""

    def __init__(self, *, prefixes: tuple[str, ...], lean: Any, full: Any) -> None:
        self.prefixes = prefixes
        self.lean = lean
        self.full = full

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"].startswith(self.prefixes):
            await self.lean(scope, receive, send)
        elif scope.get("method") == "TRACE":
            await _refuse_trace(send)
        else:
            await self.full(scope, receive, send)


async def _refuse_trace(send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 405,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_TRACE_REFUSED)).encode()),
                (b"allow", _ALLOW.encode()),
                (b"x-content-type-options", b"nosniff"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _TRACE_REFUSED})
