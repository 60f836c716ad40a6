"""A lean ASGI handler for the OpenAI-compatible API (``/v1/``).

Django's async request path is costly where it meets sync code: every ``MiddlewareMixin`` middleware
runs its ``process_request`` and ``process_response`` through ``sync_to_async(thread_sensitive=True)``
(two thread hops each, fourteen for our stack), and ``ASGIHandler`` wraps each request in a
``ThreadSensitiveContext``, which starts a fresh executor thread for the request's first such hop.
The /v1 views need none of the middleware: they authenticate with gateway keys (no session, no CSRF,
no messages), answer JSON (no clickjacking header), and check the Host header themselves. So
requests under the configured prefixes go to this handler, which

- has no middleware chain (the view's own exceptions still become responses, as in Django), and
- runs without a per-request ``ThreadSensitiveContext``: the few thread-sensitive hops left (Django's
  ``request_started`` / ``request_finished`` receivers, which keep database connections healthy)
  share one long-lived thread instead of starting one per request.

Everything else (pages, admin, /api/) keeps the full Django stack.
"""

from __future__ import annotations

from typing import Any

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response


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


class PathPrefixRouter:
    """HTTP requests whose path starts with one of ``prefixes`` go to ``lean``, all others to ``full``."""

    def __init__(self, *, prefixes: tuple[str, ...], lean: Any, full: Any) -> None:
        self.prefixes = prefixes
        self.lean = lean
        self.full = full

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"].startswith(self.prefixes):
            await self.lean(scope, receive, send)
        else:
            await self.full(scope, receive, send)
