"""The lean ASGI handler of /v1 (llmhub/handlers.py): no middleware, no request_started hop, the hop of
request_finished only when a connection has something to be checked for (core/db_use.py), and the rest of
Django's request cycle kept (the response's closers, the disconnect watch)."""

from __future__ import annotations

import asyncio
import gc
import secrets
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import signals
from django.core.cache import caches, close_caches
from django.core.cache.backends.locmem import LocMemCache
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.base import reset_urlconf
from django.db import close_old_connections, connection, reset_queries
from django.http import HttpRequest

from billing.models import ApiKey, KeyScope
from billing.services.keys import api_key_create
from llmhub.asgi import application
from llmhub.handlers import MiddlewareFreeASGIHandler
from tests.gateway.test_bad_input import answer_while_still_sending, chunked_past_the_limit

pytestmark = pytest.mark.django_db(transaction=True)


async def call(
    path: str,
    *,
    method: str = "GET",
    body: bytes = b"",
    disconnect: asyncio.Event | None = None,
    disconnect_after_response: bool = False,
    api_key: str = "",
):
    """One request through llmhub's ASGI application, in-process; returns (status, headers, body).
    ``disconnect_after_response``: ``receive`` answers ``http.disconnect`` once the response has ended, as
    uvicorn does."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            *([(b"authorization", f"Bearer {api_key}".encode())] if api_key else []),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    sent_body = False
    gone = disconnect or asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    status, headers, parts = 0, {}, []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = {name.decode().lower(): value.decode() for name, value in message["headers"]}
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if disconnect_after_response and not message.get("more_body", False):
                gone.set()

    await application(scope, receive, send)
    gone.set()
    return status, headers, b"".join(parts)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[type] = []

    def __call__(self, sender: type, **kwargs: Any) -> None:
        self.calls.append(sender)


@pytest.fixture
def request_signals():
    started, finished = Recorder(), Recorder()
    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    yield started, finished
    signals.request_started.disconnect(started)
    signals.request_finished.disconnect(finished)


async def test_v1_skips_the_middleware_and_request_started(request_signals):
    started, _ = request_signals
    status, headers, body = await call("/v1/models")
    assert status == 401 and b'"code":"missing_api_key"' in body
    assert "x-frame-options" not in headers  # no middleware ran
    # SecurityMiddleware's headers, from the handler's own precomputed list (tests/test_security_headers.py)
    assert headers["referrer-policy"] == "same-origin" and headers["x-content-type-options"] == "nosniff"
    assert headers["x-request-id"].startswith("req_")
    assert started.calls == []


# The connection of the thread the ORM's calls from /v1 views run on, and the handler's check with them
# (``sync_to_async``'s thread-sensitive thread). The tests' CONN_MAX_AGE is 0: a check closes a connection.
thread_connection_open = sync_to_async(lambda: connection.connection is not None)


# The scenarios below run on an event loop of their own (``asyncio.run`` from a sync test): the session's
# loop, where earlier tests may have left background tasks that use the database, does not run meanwhile.


def test_a_v1_request_that_used_the_database_has_its_connections_checked(request_signals):
    _, finished = request_signals

    async def scenario() -> None:
        await call("/v1/models")  # whatever that thread did before is checked now
        finished.calls.clear()
        status, _, body = await call("/v1/models", api_key=f"sk-llmhub-{secrets.token_hex(20)}")
        assert status == 401 and b"invalid_api_key" in body  # looked up in the database, not found
        assert finished.calls == [MiddlewareFreeASGIHandler]  # request_finished sent, on that thread
        assert not await thread_connection_open()  # and its connection checked: closed

    asyncio.run(scenario())


def test_a_v1_request_that_used_no_database_is_closed_without_a_hop(request_signals, monkeypatch):
    _, finished = request_signals
    closed_requests: list[HttpRequest] = []
    close = HttpRequest.close

    def recorded_close(self: HttpRequest) -> None:
        closed_requests.append(self)
        close(self)

    monkeypatch.setattr(HttpRequest, "close", recorded_close)

    async def scenario() -> None:
        await call("/v1/models")
        finished.calls.clear()
        closed_requests.clear()
        for _ in range(3):
            status, _, body = await call("/v1/models")
            assert status == 401 and b'"code":"missing_api_key"' in body
        assert finished.calls == []  # no hop: nothing to check
        assert len(closed_requests) == 3  # the response's closers ran all the same

    asyncio.run(scenario())


class ClosingCache(LocMemCache):
    """A backend with a ``close`` of its own, as memcached's has."""

    def close(self, **kwargs: Any) -> None:
        pass


@pytest.mark.parametrize("backend", ["", "tests.test_handlers.ClosingCache"], ids=["no-close", "a-close"])
def test_caches_are_closed_after_a_request_without_a_hop_when_a_backend_closes_something(
    request_signals, monkeypatch, settings, backend
):
    """``close_caches`` asks every cache used whether to close it: nothing to do for Redis's and the local memory's
    backends (``BaseCache.close``), so the handler skips it (docs/performance.md, 7 December); with a backend that
    closes something, it runs after every request as Django's ``request_finished`` would."""
    if backend:
        settings.CACHES = {**settings.CACHES, "other": {"BACKEND": backend}}
    closes: list[bool] = []
    monkeypatch.setattr(caches, "close_all", lambda: closes.append(True))

    async def scenario() -> None:
        await call("/v1/models")
        closes.clear()
        request_signals[1].calls.clear()
        for _ in range(2):
            status, _, body = await call("/v1/models")
            assert status == 401 and b'"code":"missing_api_key"' in body
        assert request_signals[1].calls == []  # closed here, without the hop
        assert closes == ([True, True] if backend else [])

    asyncio.run(scenario())


def test_a_use_of_the_checking_thread_outside_any_request_is_checked_after_the_next_request(request_signals):
    """A task that is not a request (a flusher, a cache loader) queries on the thread the check runs on:
    the next request's end checks that connection, although the request itself used no database."""
    _, finished = request_signals

    async def scenario() -> None:
        await call("/v1/models")
        await sync_to_async(get_user_model().objects.exists)()  # outside any request
        assert await thread_connection_open()
        finished.calls.clear()
        status, _, _ = await call("/v1/models")
        assert status == 401
        assert finished.calls == [MiddlewareFreeASGIHandler]
        assert not await thread_connection_open()

    asyncio.run(scenario())


async def test_other_paths_keep_the_full_django_stack(request_signals):
    started, finished = request_signals
    status, headers, _ = await call("/accounts/login/")
    assert status == 200
    assert headers["x-frame-options"] == "DENY"
    assert started.calls and finished.calls  # Django's own handler, both signals


def test_request_started_has_only_djangos_connection_receivers():
    """The lean handler skips request_started because its only receivers are these two, whose work
    request_finished repeats after the request (close_old_connections) or which matter only with
    DEBUG query logging (reset_queries). An app that adds a receiver must decide about /v1: this fails."""
    sync_receivers, async_receivers = signals.request_started._live_receivers(ASGIHandler)
    assert set(sync_receivers) == {reset_queries, close_old_connections}
    assert async_receivers == []
    # When nothing is there to be checked, the lean handler runs request_finished's other receivers itself,
    # without the hop (``llmhub.handlers._response_close``): a receiver added to it must be added there too.
    finished_sync, finished_async = signals.request_finished._live_receivers(MiddlewareFreeASGIHandler)
    assert set(finished_sync) == {close_old_connections, close_caches, reset_urlconf}
    assert finished_async == []


async def test_a_client_that_goes_away_cancels_the_view(monkeypatch):
    """Django's disconnect watch is kept: a view still waiting when the client leaves is cancelled."""
    from chat import api_openai

    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def hanging_caller(raw: str | None):
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monkeypatch.setattr(api_openai, "caller_from_api_key", hanging_caller)
    gone = asyncio.Event()
    request = asyncio.create_task(call("/v1/chat/completions", method="POST", body=b"{}", disconnect=gone))
    await asyncio.wait_for(entered.wait(), 10)
    gone.set()
    await asyncio.wait_for(request, 10)
    assert cancelled.is_set()


@pytest.mark.parametrize(
    "path, status, disconnect_after_response",
    [
        ("/v1/models", 401, True),
        ("/v1/models", 401, False),
        ("/accounts/login/", 200, True),
    ],
    ids=["lean-uvicorn", "lean-receive-pending", "full-stack-uvicorn"],
)
async def test_a_served_request_leaves_no_reference_cycle(path, status, disconnect_after_response):
    """Django's handler left each request in a reference cycle (the disconnect watch's ``RequestAborted``,
    its traceback, the frames and the tasks holding it), so the garbage collector's full collections had a
    request's worth of objects to find for every request (core/gc_tuning.py); llmhub's handlers leave none.
    ``disconnect_after_response``: uvicorn's ``receive`` answers ``http.disconnect`` once the response ended."""
    await call(path, disconnect_after_response=disconnect_after_response)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            answered, _, _ = await call(path, disconnect_after_response=disconnect_after_response)
            assert answered == status
        gc.collect()
        kinds = {type(item).__name__ for item in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    # The handler's own: its tasks, the disconnect watch's exception and the frames its traceback held.
    handlers_own = {"Task", "RequestAborted", "CancelledError", "frame", "traceback", "coroutine"}
    # The login page's form keeps the request in a cycle of its own (Django's forms and the session's lazy
    # user), so only the /v1 path, which has no forms, is held to leaving no request behind at all.
    assert not kinds & (handlers_own | ({"ASGIRequest", "HttpResponse"} if path.startswith("/v1/") else set()))


def test_an_event_stream_is_sent_part_by_part_and_closed():
    """``EventStreamResponse`` skips Django's streaming wrappers in the lean handler: each framed event is one
    ``http.response.body`` message, as it came, with the response's headers; its iterator is closed when the
    stream ends, and when the send fails midway (a client gone)."""
    from core.event_stream import EventStreamResponse

    closed: list[str] = []

    async def events(name: str):
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            closed.append(name)

    async def serve(name: str, fail_after: int | None = None) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            if fail_after is not None and len(messages) == fail_after:
                raise OSError("the client went away")
            messages.append(message)

        handler = MiddlewareFreeASGIHandler()
        response = EventStreamResponse(events(name))
        response["x-request-id"] = "req-1"
        try:
            await handler.send_response(response, send)
        except OSError:
            pass
        return messages

    messages = asyncio.run(serve("whole"))
    start, *bodies, end = messages
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"Content-Type"] == b"text/event-stream"
    assert headers[b"Cache-Control"] == b"no-cache"
    assert headers[b"x-request-id"] == b"req-1"
    assert [body["body"] for body in bodies] == [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    assert all(body["more_body"] for body in bodies)
    assert end == {"type": "http.response.body"}
    assert closed == ["whole"]

    asyncio.run(serve("cut", fail_after=2))
    assert closed == ["whole", "cut"]


def test_other_streaming_responses_keep_djangos_path():
    """A plain ``StreamingHttpResponse`` (a CSV export) still goes through Django's ``send_response``."""
    from django.http import StreamingHttpResponse

    async def serve() -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        async def rows():
            yield "a,b\n"  # str: Django's make_bytes encodes it
            yield b"1,2\n"

        response = StreamingHttpResponse(rows(), content_type="text/csv")
        await MiddlewareFreeASGIHandler().send_response(response, send)
        return messages

    messages = asyncio.run(serve())
    assert [m.get("body") for m in messages[1:]] == [b"a,b\n", b"1,2\n", None]


class ResolveCounter:
    """``URLResolver.resolve`` of the root URL configuration, counting the paths it is asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from django.urls.resolvers import URLResolver

        self.paths: list[str] = []
        original = URLResolver.resolve

        def resolve(resolver: URLResolver, path: str) -> Any:
            if resolver.pattern.regex.pattern == "^/":  # the root resolver, not the includes it walks
                self.paths.append(path)
            return original(resolver, path)

        monkeypatch.setattr(URLResolver, "resolve", resolve)


async def test_a_v1_route_without_arguments_is_resolved_once(monkeypatch):
    counter = ResolveCounter(monkeypatch)
    for _ in range(3):
        status, _, body = await call("/v1/models")
        assert status == 401 and b'"code":"missing_api_key"' in body
    assert counter.paths.count("/v1/models") <= 1
    # A path with arguments is the client's to choose: resolved every time, never kept.
    for _ in range(2):
        status, _, body = await call("/v1/models/some-model")
        assert status == 401
    assert counter.paths.count("/v1/models/some-model") == 2
    for _ in range(2):
        status, _, body = await call("/v1/no-such-route")
        assert status == 404 and b'"code":"unknown_url"' in body
    assert counter.paths.count("/v1/no-such-route") == 2


async def test_a_changed_url_configuration_is_resolved_again(monkeypatch, settings):
    counter = ResolveCounter(monkeypatch)
    await call("/v1/models")
    before = counter.paths.count("/v1/models")
    settings.ROOT_URLCONF = "bench.urls"  # another resolver: what the first one resolved is not reused
    for _ in range(2):
        status, _, _ = await call("/v1/models")
        assert status == 401
    assert counter.paths.count("/v1/models") == before + 1


@pytest.mark.parametrize("length", [f"Content-Length: {10**10}", "Transfer-Encoding: chunked"])
def test_a_sign_in_past_the_upload_limit_is_refused_without_reading_the_rest(llmhub_server, length):
    """As on /v1 (tests/gateway/test_bad_input.py): Django read a body whole, to a temporary file on disk, before
    any middleware or view, so the sign-in page let anyone fill the server's disk with one request."""
    token = httpx.get(llmhub_server.url + "/accounts/login/").cookies[settings.CSRF_COOKIE_NAME]
    head = [
        "POST /accounts/login/ HTTP/1.1",
        "Content-Type: application/x-www-form-urlencoded",
        f"Cookie: {settings.CSRF_COOKIE_NAME}={token}",
        f"X-CSRFToken: {token}",
        length,
    ]
    status, _ = answer_while_still_sending(llmhub_server.url, head, chunked_past_the_limit())
    assert status == 400


def test_an_api_body_cut_at_the_upload_limit_is_refused_not_read_cut_short(llmhub_server):
    """A chunked body is read no further than the limit: what was read is refused, not taken for the whole (here a
    JSON object followed by spaces, which cut short would still have created the key)."""
    user = get_user_model().objects.create_user("keys-owner")
    manager = api_key_create(user=user, name="manager", scopes=[KeyScope.KEYS_MANAGE])
    body = b'{"name": "past the limit"}' + b" " * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 65536)
    parts = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    head = [
        "POST /api/keys/ HTTP/1.1",
        "Content-Type: application/json",
        f"Authorization: Bearer {manager.secret}",
        "Transfer-Encoding: chunked",
    ]
    status, _ = answer_while_still_sending(llmhub_server.url, head, chunks)
    assert status == 400
    assert not ApiKey.objects.filter(name="past the limit").exists()
