"""The SDKs' aiohttp-based HTTP client (``DefaultAioHttpClient``) under the outbound policy.

Both official SDKs can send through aiohttp instead of httpx2's own connection pool: their
``DefaultAioHttpClient`` is an ``httpx2.AsyncClient`` whose transport (``AiohttpTransport``, vendored by
the SDKs from httpx-aiohttp 0.2.0) hands each request to an ``aiohttp.ClientSession``. This module gives
that transport (``outbound.outbound_client`` builds the client on it) the guarantees of
``providers.outbound.OutboundTransport`` (docs/outbound.md):

* **addresses judged at connect time**: the session's connector resolves every host name through
  ``GuardedResolver`` (``outbound.resolver``, then ``outbound.check_addresses``) and connects to the very
  addresses it judged; its DNS cache is off, so every new connection is judged again. aiohttp never asks
  a resolver about an IP literal, so the connector judges a literal host itself before each new connection.
* **no redirect off the origin**: the transport refuses any request to another origin than the one it
  was built for, before anything is sent (the httpx2 client follows redirects; aiohttp's own following is
  off in the transport);
* **one deadline**: ``upstream_deadline`` and the response hook are the httpx2 client's, unchanged; the
  connect and read timeouts go to aiohttp as ``sock_connect`` and ``sock_read``;
* no proxy from the environment, no Unix socket.

Which client the adapters use is ``LLMHUB_PROVIDER_HTTP_CLIENT`` ("httpx" or "aiohttp"), read by
``providers.adapters.common.provider_http_client``; docs/performance.md has the measurements.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict

# The transport both SDKs' DefaultAioHttpClient uses (openai and anthropic vendor the same file).
from openai._vendor.httpx_aiohttp.transport import AiohttpTransport, map_aiohttp_exceptions

from .. import outbound
from .sdk_requests import REQUEST_OWN_HEADERS


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, replaced: resolve with ``outbound.resolver``, refuse the connection if any
    address is refused (``OutboundRefused`` goes through aiohttp unwrapped), and answer only the addresses
    judged, so the connector connects to nothing else."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = outbound._literal_or_blocked(host)
        if addresses is None:
            try:
                found = await outbound.resolver.resolve(host, port)
            except OSError as exc:
                raise OSError(f"{host} could not be resolved ({exc})") from None
            addresses = outbound.check_addresses(host, found)
        results: list[ResolveResult] = []
        for address in addresses:
            target = outbound._connect_target(address)
            results.append(
                {
                    "hostname": host,
                    "host": target,
                    "port": port,
                    "family": socket.AF_INET6 if ":" in target else socket.AF_INET,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        if not results:
            raise OSError(f"{host} has no address")
        return results

    async def close(self) -> None:
        return None


class _IdleBoundedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, keeping at most ``max_idle`` released connections per host for reuse, as httpx2's
    ``Limits.max_keepalive_connections`` says (aiohttp itself keeps every one): a burst of 500 streams to
    one provider would otherwise leave 500 idle connections open to it for the keep-alive time. A
    connection released beyond that is closed. aiohttp is pinned (pyproject.toml), and
    ``tests/providers/test_provider_http_client.py`` holds this override to the version's ``_release``."""

    def __init__(self, *, max_idle: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_idle = max_idle
        self._factory = functools.partial(_QuietTimerProtocol, loop=self._loop)

    async def _resolve_host(self, host: str, port: int, traces: Any = None) -> list[ResolveResult]:
        # aiohttp connects to an IP literal without asking the resolver: the guard judges it here, for every
        # new connection, as ``GuardedResolver`` judges a name (not for every request: a pooled connection
        # was judged when it was opened, as with httpx2's guarded backend).
        if outbound.literal_address(host) is not None:
            outbound._literal_or_blocked(host)
        return await super()._resolve_host(host, port, traces=traces)

    def _release(self, key: Any, protocol: Any, *, should_close: bool = False) -> None:
        if self._max_idle is not None and len(self._conns.get(key, ())) >= self._max_idle:
            should_close = True
        super()._release(key, protocol, should_close=should_close)


class _QuietTimerProtocol(ResponseHandler):
    """aiohttp's connection protocol with its read timeout (``sock_read``: no byte from the upstream for that
    long) kept as one timer per quiet spell, as the relay's idle watch is (``chat.pipeline._IdleWatch``).
    aiohttp cancels its timer and starts another on every read, 2.1 µs of CPU each (uvloop): a stream's every
    chunk paid it, 4 % of a paced chunk's cost. Here a read only notes when the spell ends (``_read_due``);
    the timer, when it fires, finds the spell moved on and waits for its new end, or reports the timeout as
    aiohttp does. A start with a shorter timeout than the armed timer's re-arms it. aiohttp is pinned
    (pyproject.toml); ``tests/providers/test_provider_http_client.py`` holds this to its timeout's meaning."""

    _read_due = 0.0

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._drop_timeout()
            return
        due = self._loop.time() + timeout
        self._read_due = due
        handle = self._read_timeout_handle
        if handle is None or handle.when() > due:
            if handle is not None:
                handle.cancel()
            self._read_timeout_handle = self._loop.call_at(due, self._read_timeout_check)

    def _read_timeout_check(self) -> None:
        due = self._read_due
        now = self._loop.time()
        if now < due:
            # Not a spin when the loop's clock ticks a little early: at least a millisecond later.
            self._read_timeout_handle = self._loop.call_at(max(due, now + 0.001), self._read_timeout_check)
            return
        self._read_timeout_handle = None
        self._on_read_timeout()


class GuardedAiohttpTransport(AiohttpTransport):
    """``AiohttpTransport`` bound to one origin, over a session whose connector resolves through the guard."""

    def __init__(self, *, origin: str, limits: httpx2.Limits) -> None:
        super().__init__(verify=outbound._ssl_context(), limits=limits, trust_env=False)
        self.origin = outbound.origin_of(origin)
        self.client = self._guarded_session
        self._loop: asyncio.AbstractEventLoop | None = None
        # The headers of this client's requests but their own (``REQUEST_OWN_HEADERS``), decoded: ``_aiohttp_headers``.
        self._decoded: dict[tuple[tuple[bytes, bytes, bytes], ...], CIMultiDict[str] | None] = {}

    def _guarded_session(self) -> aiohttp.ClientSession:
        connector = _IdleBoundedConnector(
            max_idle=self.limits.max_keepalive_connections,
            limit=self.limits.max_connections or 0,
            limit_per_host=0,
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
            resolver=GuardedResolver(),
            use_dns_cache=False,  # every new connection is judged, as with httpx2's guarded backend
        )
        self._loop = asyncio.get_running_loop()
        return aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False)

    def connections_in_use(self) -> list[Any]:
        """The connections a call holds (a request waiting, a response being read), for the registry's
        "is this retired client still busy?" (``registry._busy``): each answers ``is_idle()`` False."""
        session = self.client
        if not isinstance(session, aiohttp.ClientSession) or session.closed or session.connector is None:
            return []
        return [_Busy() for _ in session.connector._acquired]  # aiohttp keeps no public count

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        outbound._refuse_other_origin(self.origin, request.url)
        if isinstance(self.client, aiohttp.ClientSession) and self._loop is not asyncio.get_running_loop():
            # A session belongs to the loop it was made in; a client used from another loop gets its own.
            self.client = self._guarded_session
        request = _sent_in_pieces(request)
        headers = request.headers
        decoded = self._aiohttp_headers(request)
        if decoded is not None:
            # The vendored transport hands aiohttp ``request.headers`` as they are; these are the same headers.
            request.headers = decoded  # type: ignore[assignment]
        try:
            response = await super().handle_async_request(request)
        except httpx2.TimeoutException as exc:
            raise _remapped(exc) from exc.__cause__
        finally:
            request.headers = headers
        response.stream = _GuardedStream(response.stream._aiohttp_response)
        return response

    def _aiohttp_headers(self, request: httpx2.Request) -> CIMultiDict[str] | None:
        """The request's headers as aiohttp takes them, the names and values it made of ``httpx2.Headers`` (a
        comma-joined value per lower-case name): None to leave that to aiohttp. Given ``httpx2.Headers``, aiohttp
        decodes every name and value again for every request (``Headers.items``) and builds a multidict of
        them: 8.4 µs of CPU a request of 18 headers, all but one or two of which (``REQUEST_OWN_HEADERS``, last in
        a templated request: ``sdk_requests``) are the same for every request of a client. Those are decoded
        once per set (a handful per client; the cache is emptied past ``_DECODED_MAX``), the request's own
        added. A body sent in pieces (``_sent_in_pieces``), a set that is not ASCII or a name of the request's
        own that repeats are left to aiohttp."""
        try:
            request.content  # noqa: B018 (a streamed body: the vendored transport edits its headers)
        except httpx2.RequestNotRead:
            return None
        entries = request.headers._list
        shared = len(entries)
        while shared and entries[shared - 1][1] in REQUEST_OWN_HEADERS:
            shared -= 1
        key = tuple(entries[:shared])
        try:
            decoded = self._decoded[key]
        except KeyError:
            if len(self._decoded) >= _DECODED_MAX:
                self._decoded.clear()
            decoded = self._decoded[key] = _decoded(key)
        if decoded is None:
            return None
        headers = CIMultiDict(decoded)
        for _, name, value in entries[shared:]:
            try:
                text = name.decode("ascii")
                if text in headers:
                    return None  # joined with the shared value by httpx2: aiohttp's way
                headers[text] = value.decode("ascii")
            except UnicodeDecodeError:
                return None
        return headers


# Sets of a client's headers decoded at most (``GuardedAiohttpTransport._aiohttp_headers``).
_DECODED_MAX = 32


def _decoded(entries: tuple[tuple[bytes, bytes, bytes], ...]) -> CIMultiDict[str] | None:
    """``entries`` (``httpx2.Headers``' own) as aiohttp's multidict of ``Headers.items``; None unless ASCII (the
    request's own headers could then change the encoding httpx2 decodes them all with)."""
    headers = httpx2.Headers()
    headers._list = list(entries)
    if headers.encoding != "ascii":
        return None
    return CIMultiDict(headers.items())


# A request body past this is handed to aiohttp in pieces of this size (``_sent_in_pieces``).
SEND_PIECE_BYTES = 256 * 1024


def _sent_in_pieces(request: httpx2.Request) -> httpx2.Request:
    """``request`` with a body past ``SEND_PIECE_BYTES`` handed to aiohttp in pieces, the same bytes under the same
    Content-Length. Given the bytes whole, aiohttp writes them in one call, and Python 3.11's transport copies what the
    socket did not take at once into its buffer (its ``writelines`` joins them with the headers first): a request
    carrying a 30 MB photo was held three times while it was sent, as the client's JSON, as the bytes the SDK encoded
    and as the transport's copy. A piece at a time, each written once the buffer has drained (aiohttp's), the copy
    is a piece. A smaller body is sent as before."""
    try:
        content = request.content
    except httpx2.RequestNotRead:
        return request
    if len(content) <= SEND_PIECE_BYTES or "content-length" not in request.headers:
        return request
    return httpx2.Request(
        request.method, request.url, headers=request.headers, stream=_Pieces(content), extensions=request.extensions
    )


class _Pieces(httpx2.AsyncByteStream):
    """Bytes as views of ``SEND_PIECE_BYTES`` each (no copy)."""

    def __init__(self, content: bytes) -> None:
        self._content = content

    async def __aiter__(self) -> AsyncIterator[bytes]:
        view = memoryview(self._content)
        for at in range(0, len(view), SEND_PIECE_BYTES):
            yield view[at : at + SEND_PIECE_BYTES]  # type: ignore[misc]


def _remapped(exc: httpx2.TimeoutException) -> httpx2.TransportError:
    """The vendored transport maps every ``aiohttp.ClientConnectionError`` to ``ConnectTimeout`` (its map
    prefers the broader class), so a refused connection or a server that hung up would read as a timeout
    (504 instead of 503, "no data arrived in time"): only a real timeout stays one."""
    cause = exc.__cause__
    if cause is None or isinstance(cause, asyncio.TimeoutError):
        return exc
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx2.ConnectError(str(cause))
    if isinstance(cause, aiohttp.ClientConnectionError):
        return httpx2.ReadError(str(cause))
    return exc


class _GuardedStream(httpx2.AsyncByteStream):
    """The vendored ``AiohttpResponseStream`` with its errors mapped right (``_remapped``) in the same frame:
    the body's pieces come straight from aiohttp's reader, through one generator rather than two (every
    frame between the socket and the client is resumed for every chunk of a stream). Read with ``iter_any``
    (what has arrived, at once) rather than the vendored ``iter_chunked(16 KiB)``, which hands out the same
    pieces (it too returns what is there, up to 16 KiB) through ``read(n)``'s longer path and a lambda a
    piece; the reader's buffer limits are the session's ``read_bufsize`` (256 KiB) either way."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            with map_aiohttp_exceptions():
                async for piece in self._response.content.iter_any():
                    yield piece
        except httpx2.TimeoutException as exc:
            raise _remapped(exc) from exc.__cause__

    async def aclose(self) -> None:
        with map_aiohttp_exceptions():
            await self._response.__aexit__(None, None, None)


class _Busy:
    """A connection in use, as the registry asks of httpcore's."""

    def is_idle(self) -> bool:
        return False

    def is_closed(self) -> bool:
        return False
