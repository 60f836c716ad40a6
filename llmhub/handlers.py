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
- makes that hop only when there is something to check (``core/db_use.py``): when the request used the
  database, or the hop's thread used its connections since its last check. Otherwise the response is
  closed where it is, and ``request_finished``'s other receivers (``close_caches``, ``reset_urlconf``:
  context-local, no I/O with our cache backends) run here; ``close_caches`` only when a configured cache's
  backend closes something (``_caches_close_something``: neither Redis's nor the local memory's does). The hop
  was most of this handler's own CPU (in-process, a view that does nothing: 313–389 µs a request with it,
  83–125 µs without, on a loaded machine), and most /v1 requests use no connection on that thread.

What ``SecurityMiddleware`` does for the full stack is done here too, from headers computed once
(``TransportSecurity``): HSTS and the other security headers on every response, and, where production
asks for HTTPS (``SECURE_SSL_REDIRECT``), a plain-HTTP request is refused instead of redirected: a
redirect would let a misconfigured client keep working while it sends its key in clear on every
request (and resend it, with the body, to the redirect), where a refusal shows the mistake at once.

Everything else (pages, admin, /api/) keeps the full Django stack.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core import signals
from django.core.cache import caches, close_caches
from django.core.cache.backends.base import BaseCache
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.base import reset_urlconf
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest, HttpResponse
from django.urls import ResolverMatch, get_resolver, set_script_prefix
from django.utils.module_loading import import_string

from core.db_use import (
    RequestDatabaseUse,
    db_use_checked,
    db_use_request_begin,
    db_use_request_end,
    db_use_unchecked,
)
from core.errors import anthropic_error_body, json_response, openai_error_body, speaks_anthropic
from core.event_stream import EventStreamResponse
from core.tracing import trace_incoming_bind, tracing_active

logger = logging.getLogger("llmhub.handlers")


class TransportSecurity:
    """``SecurityMiddleware``'s work for the lean handler, read from the same settings once, at start-up.

    ``request.is_secure()`` reads the scheme the server gave the request (uvicorn's ``--proxy-headers``: a
    trusted proxy's ``X-Forwarded-Proto``), as the middleware does; paths matching
    ``SECURE_REDIRECT_EXEMPT`` are served over plain HTTP, as the middleware serves them."""

    def __init__(self) -> None:
        self.https_only = bool(settings.SECURE_SSL_REDIRECT)
        self.exempt = tuple(re.compile(pattern) for pattern in settings.SECURE_REDIRECT_EXEMPT)
        headers: list[tuple[str, str]] = []
        if settings.SECURE_CONTENT_TYPE_NOSNIFF:
            headers.append(("X-Content-Type-Options", "nosniff"))
        policy = settings.SECURE_REFERRER_POLICY
        if policy:
            parts = [part.strip() for part in policy.split(",")] if isinstance(policy, str) else policy
            headers.append(("Referrer-Policy", ",".join(parts)))
        if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
            headers.append(("Cross-Origin-Opener-Policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY))
        self.headers = tuple(headers)
        self.secure_headers = self.headers
        if settings.SECURE_HSTS_SECONDS:
            hsts = f"max-age={settings.SECURE_HSTS_SECONDS}"
            if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
                hsts += "; includeSubDomains"
            if settings.SECURE_HSTS_PRELOAD:
                hsts += "; preload"
            self.secure_headers = (("Strict-Transport-Security", hsts), *self.headers)

    def refuses(self, request: HttpRequest) -> bool:
        """Whether a request that came over plain HTTP is refused."""
        return self.https_only and not any(pattern.search(request.path.lstrip("/")) for pattern in self.exempt)

    @staticmethod
    def refusal(path: str = "", headers: Any = ()) -> HttpResponse:
        message = (
            "This API is served over HTTPS only. The request was sent over plain HTTP: use an https:// base "
            "URL, and replace any API key sent this way, as it may have been read on the way."
        )
        if speaks_anthropic(path, headers):
            body = anthropic_error_body(message, status=403)  # Anthropic's clients read Anthropic's shape
        else:
            body = openai_error_body(message, error_type="invalid_request_error", code="https_required")
        return json_response(body, status=403)

    def wrap(self, get_response: Callable[[HttpRequest], Awaitable[HttpResponse]]) -> Any:
        async def secured(request: HttpRequest) -> HttpResponse:
            secure = request.is_secure()
            if not secure and self.refuses(request):
                response = self.refusal(request.path, request.headers)
            else:
                response = await get_response(request)
            for name, value in self.secure_headers if secure else self.headers:
                response.headers.setdefault(name, value)
            return response

        return secured


class FullStackASGIHandler(ASGIHandler):
    """Django's own handler for every path outside the lean prefixes (pages, admin, /api/), with the
    disconnect watch that raises nothing (``_disconnect``): Django's ``RequestAborted`` made every request a
    reference cycle that only the garbage collector could free (core/gc_tuning.py)."""

    async def listen_for_disconnect(self, receive: Any) -> None:
        await _disconnect(receive)

    async def read_body(self, receive: Any) -> Any:
        return await _read_body_bounded(None, receive)

    def create_request(self, scope: dict[str, Any], body_file: Any) -> tuple[HttpRequest | None, Any]:
        """Django's, with a body cut at the upload limit (``_read_body_bounded``) refused as one announced over it:
        its form or JSON would otherwise be read cut short."""
        request, error_response = super().create_request(scope, body_file)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if request is not None and limit is not None and _announced_length(scope) <= limit:
            size = body_file.seek(0, 2)
            body_file.seek(0)
            if size > limit:
                request.META["CONTENT_LENGTH"] = str(size)
        return request, error_response


# Paths kept resolved by ``MiddlewareFreeASGIHandler.resolve_request``: the routes without arguments under its
# prefixes are a dozen; past this (URL configurations swapped, as tests do), the cache starts again.
_RESOLVED_MAX = 64


class MiddlewareFreeASGIHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        self._resolved: dict[tuple[Any, str], ResolverMatch] = {}
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        if not is_async:
            raise ValueError("the lean /v1 handler serves ASGI only")
        # As in Django's chain, each layer converts exceptions: a view's error response gets the headers too.
        handler = convert_exception_to_response(self._get_response_async)
        self._middleware_chain = convert_exception_to_response(TransportSecurity().wrap(handler))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)

    def resolve_request(self, request: HttpRequest) -> ResolverMatch:
        """Django's, with the match of a path that resolves to a view without arguments (``/v1/chat/completions``,
        ``/v1/messages``, …) kept per URL resolver: every request to it resolved it again, walking the routes
        before it one by one (9 µs of CPU for ``/v1/chat/completions`` in a loop, 27 for ``/v1/messages``, and
        about 60 µs a request in-process: docs/performance.md, 5–6 December). A path with
        arguments (``/v1/models/<model>``, an unknown path) is the client's to choose, and is resolved each
        time; so is every path of a request with a URL configuration of its own (``request.urlconf``)."""
        if hasattr(request, "urlconf"):
            return super().resolve_request(request)
        resolver = get_resolver()
        key = (resolver, request.path_info)
        match = self._resolved.get(key)
        if match is None:
            match = resolver.resolve(request.path_info)
            if not match.args and not match.kwargs:
                if len(self._resolved) >= _RESOLVED_MAX:
                    self._resolved.clear()
                self._resolved[key] = match
        request.resolver_match = match
        return match

    async def send_response(self, response: Any, send: Any) -> None:
        """Django's, except for an ``EventStreamResponse``: its parts (framed events, a few hundred bytes
        each) go to the server as they come, without the three generators Django puts between a streaming
        response's iterator and ``send`` (core/event_stream.py): a chunk of a stream costs that much less."""
        if not isinstance(response, EventStreamResponse) or response.cookies:
            await super().send_response(response, send)
            return
        headers = [(header.encode("ascii"), value.encode("latin1")) for header, value in response.items()]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        async with aclosing(response.events) as events:
            async for part in events:
                await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body"})

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Django 5.2's ``ASGIHandler.handle`` without ``request_started`` (see the module's docstring), and
        with no reference cycle left behind (``_disconnect``); the disconnect watch and what a disconnect
        cancels are Django's own."""
        if tracing_active():
            trace_incoming_bind(scope["headers"])  # a caller's traceparent: the request's span joins its trace
        try:
            body_file = await _read_body_bounded(scope, receive)
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

        # The request's uses of the database are noted from here, by its tasks too (``core/db_use.py``).
        database_use, database_use_token = db_use_request_begin()
        # The disconnect watch first: it raises nothing unexpected that would keep the view from being
        # cancelled (Django's order and reasoning).
        tasks = [
            asyncio.create_task(_disconnect(receive)),
            asyncio.create_task(process_request()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if not task.done():
                    task.cancel()
                    await asyncio.wait([task])
                elif not task.cancelled() and (error := task.exception()) is not None:
                    body_file.close()
                    raise error
            served = tasks[1]
            if served.cancelled():
                await signals.request_finished.asend(sender=self.__class__)
            else:
                await _response_close(served.result(), database_use)
        finally:
            db_use_request_end(database_use_token)
            # No exception of this request is raised in this frame on its normal paths, and the tasks are
            # let go of here: a frame kept by a traceback that holds the tasks that hold that traceback is a
            # reference cycle, which only the garbage collector frees (core/gc_tuning.py).
            tasks.clear()
        body_file.close()


async def _read_body_bounded(scope: dict[str, Any] | None, receive: Any) -> Any:
    """Django's ``read_body``, stopped at the path's limit (``_body_limit``). Django's reads a body whole whatever its
    size (past ``FILE_UPLOAD_MAX_MEMORY_SIZE`` into a temporary file on disk) before any view runs, so any client,
    with or without a key, could fill the server's disk with one request announcing 10 GB, or chunked without end.
    A body announced over the limit is not read at all on /v1 (``parse_body`` refuses it by its Content-Length;
    Django's full stack, which hands this no ``scope``, reads up to the limit), and one sent without a length is
    read up to one byte past the limit (``parse_body`` measures what arrived; on the full stack,
    ``FullStackASGIHandler.create_request``): the 413 (on /v1 with its ledger row; 400 on the full stack) goes out
    while the client is still sending, and the rest is discarded by ``_disconnect``."""
    limit = _body_limit(scope)
    if limit is not None and scope is not None and _announced_length(scope) > limit:
        return io.BytesIO()
    message = await receive()
    if message["type"] == "http.disconnect":
        raise RequestAborted()
    chunk = message.get("body") or b""
    if not message.get("more_body", False) and len(chunk) <= settings.FILE_UPLOAD_MAX_MEMORY_SIZE:
        # The whole body in one message, as a client's request nearly always comes: what the spooled file would
        # have held in memory (a ``BytesIO`` of its own), without the file's making (1.5 µs of CPU a request).
        return io.BytesIO(chunk)
    body_file = tempfile.SpooledTemporaryFile(max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE, mode="w+b")
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            body_file.close()
            raise RequestAborted()
        if chunk := message.get("body"):
            body_file.write(chunk)
            size += len(chunk)
        if not message.get("more_body", False) or (limit is not None and size > limit):
            break
        message = await receive()
    body_file.seek(0)
    return body_file


def _body_limit(scope: dict[str, Any] | None) -> int | None:
    """The /v1 API's limit (``LLMHUB_MAX_REQUEST_BYTES``: a request carrying a photo or a PDF is large); Django's
    (``DATA_UPLOAD_MAX_MEMORY_SIZE``) for every other path, the probes and the full stack's forms among them."""
    if scope is not None and scope["path"].startswith("/v1/"):
        return settings.LLMHUB_MAX_REQUEST_BYTES
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE


def _announced_length(scope: dict[str, Any]) -> int:
    """The request's Content-Length, 0 when it has none (or none a number: the server refuses those itself)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


async def _response_close(response: HttpResponse, database_use: RequestDatabaseUse) -> None:
    """``response.close()``, which sends ``request_finished``, on the thread whose connections its
    ``close_old_connections`` checks; or, with nothing there to check, all the rest of it here, without the
    hop (the module's docstring)."""
    if db_use_unchecked(database_use):
        await sync_to_async(_response_close_checking)(response)
        return
    for closer in response._resource_closers:  # what ``HttpResponse.close`` does, but for the signal
        try:
            closer()
        except Exception:  # as in Django's: a closer's failure must not fail the request's end
            logger.debug("closing a response's resource failed", exc_info=True)
    response._resource_closers.clear()
    response.closed = True
    if _caches_close_something():
        close_caches(sender=MiddlewareFreeASGIHandler)
    reset_urlconf(sender=MiddlewareFreeASGIHandler)


# The configured caches (``caches.settings``, a new dict whenever ``CACHES`` changes) and whether any of their
# backends closes something at a request's end.
_caches_closing: tuple[Any, bool] = (None, True)


def _caches_close_something() -> bool:
    """Whether ``close_caches`` (``request_finished``'s receiver) has anything to do: whether a configured cache's
    backend has a ``close`` of its own. Redis's and the local memory's (production's and the tests') inherit
    ``BaseCache.close``, which does nothing, and ``close_caches`` still asked asgiref's ``Local`` for each alias
    whether it was used (4 µs of CPU in a loop, more in a request: docs/performance.md, 7 December). A backend
    that closes something (memcached's) is closed after every request, as Django does."""
    global _caches_closing
    configured = caches.settings
    known, closing = _caches_closing
    if known is not configured:
        try:
            closing = any(import_string(cache["BACKEND"]).close is not BaseCache.close for cache in configured.values())
        except Exception:  # a backend that cannot be imported fails where it is used; Django's path is kept here
            closing = True
        _caches_closing = (configured, closing)
    return closing


def _response_close_checking(response: HttpResponse) -> None:
    db_use_checked()
    response.close()


async def _disconnect(receive: Any) -> None:
    """Django's ``listen_for_disconnect`` without its ``RequestAborted``: the client's disconnect, or the end
    of the response (uvicorn then answers ``http.disconnect`` too), ends the task with no exception. An
    exception stored in the task, its traceback and the frames in it would be a reference cycle for every
    request. The rest of a body refused for its size (``_read_body_bounded``) arrives here, and is discarded."""
    message = await receive()
    while message["type"] == "http.request":
        message = await receive()
    if message["type"] != "http.disconnect":
        raise AssertionError(f"Invalid ASGI message after request body: {message['type']}")


# What the full stack's views implement, TRACE excepted: a 405 must say what is allowed (RFC 9110, 15.5.6).
_ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
_TRACE_REFUSED = json.dumps(
    openai_error_body("Method not allowed (TRACE).", error_type="invalid_request_error", code="method_not_allowed")
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
