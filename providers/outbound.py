"""Where the gateway may send a request: one policy for every outbound HTTP connection (SSRF guard).

A provider's base URL is chosen by an administrator, but what its name resolves to, and where its
server redirects, is chosen by whoever runs that server and its DNS. So the address is judged when a
connection is opened, not (only) when the URL is saved: the network backend below resolves the name
itself, judges every address it got, and connects to the address it judged, so nothing can change
between the check and the connect (DNS rebinding). The Host header and the TLS server name stay the
URL's host name. The transport built on it also refuses any request to another origin (scheme, host
and port) than the one it was made for, which is how a redirect off the provider's origin is refused
before anything is sent to the redirect's target; a same-origin redirect is followed, and any new
connection it needs is judged like the first.

The rules (``address_refusal``):

* never: link-local (169.254/16, where cloud metadata services answer, and fe80::/10), the
  unspecified and "this network" addresses (0.0.0.0/8, ::), multicast, reserved space (240/4),
  Teredo (2001::/32, whose embedded address cannot be judged), the known metadata addresses that sit
  in other ranges, and the metadata host names (``BLOCKED_NAMES``, refused by name because they only
  resolve inside the cloud they belong to);
* private, loopback, unique-local, shared (100.64/10) and other non-global space: only when
  ``LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS`` is on, or the address is inside one of
  ``LLMHUB_OUTBOUND_ALLOWED_NETWORKS``;
* an IPv6 address that carries an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible
  ``::a.b.c.d``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, 6to4 ``2002::/16``) is also judged as
  that IPv4 address, since that is where the packets end up.

Tests swap ``resolver`` for one they control; everything else here runs as in production.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import anyio
import httpcore
import httpcore2
import httpx
import httpx2
from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata host names: they resolve only inside their cloud (so a check at save time finds
# nothing to judge) and always to a metadata address.
BLOCKED_NAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.internal",
        "instance-data",
        "instance-data.ec2.internal",
    }
)

_NEVER = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host on Linux
        "169.254.0.0/16",  # link-local: AWS, GCP, Azure and OpenStack metadata services live here
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
        "100.100.100.200/32",  # Alibaba Cloud metadata (inside the shared 100.64/10 space)
        "168.63.129.16/32",  # Azure's host endpoint (a public-looking address)
        "::/128",
        "fe80::/10",  # link-local
        "ff00::/8",  # multicast
        "2001::/32",  # Teredo: the IPv4 address behind it is obfuscated and relayed
        "fd00:ec2::254/128",  # AWS metadata over IPv6 (inside the unique-local fc00::/7)
    )
)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

NEVER = "never"
PRIVATE = "private"


class OutboundRefused(Exception):
    """The policy refused a destination. The message names the host and the address, never a credential."""

    def __init__(self, message: str, *, host: str = "", reason: str = NEVER) -> None:
        super().__init__(message)
        self.message = message
        self.host = host
        self.reason = reason


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries to (mapped, compatible, NAT64, 6to4), if any."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in _NAT64) or (
        address in _IPV4_COMPATIBLE and int(address) > 1  # not :: or ::1, which are IPv6's own
    ):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@functools.lru_cache(maxsize=16)
def _networks(spec: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in spec if item.strip())


def allowed_networks() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return _networks(tuple(getattr(settings, "LLMHUB_OUTBOUND_ALLOWED_NETWORKS", ()) or ()))


def allow_private() -> bool:
    return bool(getattr(settings, "LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS", False))


def address_refusal(
    address: IPAddress,
    *,
    allow_private: bool,
    allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> str | None:
    """Why the gateway may not connect to ``address`` (``NEVER`` or ``PRIVATE``), or None when it may."""
    judged = [address]
    inner = embedded_ipv4(address)
    if inner is not None:
        judged.append(inner)
    if any(item in network for item in judged for network in _NEVER):
        return NEVER
    if allow_private:
        return None
    for item in judged:
        # not is_global: also refuses shared (100.64/10), benchmarking and documentation space, not only RFC 1918.
        if not item.is_global and not any(item in network for network in allowed if network.version == item.version):
            return PRIVATE
    if inner is not None and address in _NAT64[1]:
        return PRIVATE  # local-use NAT64 (RFC 8215) translates through a gateway of the local network
    return None


def address_allowed(address: IPAddress, allow_private: bool) -> bool:
    return address_refusal(address, allow_private=allow_private, allowed=allowed_networks()) is None


def refusal_message(host: str, address: IPAddress | None, reason: str) -> str:
    if address is None:
        return f"{host} is a cloud metadata host, which the gateway never connects to."
    shown = host if host == str(address) else f"{host} resolves to {address}, which"
    if reason == NEVER:
        return f"{shown} is a link-local, metadata, unspecified or reserved address the gateway never connects to."
    return f"{shown} is a private address; set LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS to allow it."


def host_is_blocked_name(host: str) -> bool:
    return host.rstrip(".").lower() in BLOCKED_NAMES


def literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def check_addresses(host: str, addresses: Iterable[IPAddress]) -> list[IPAddress]:
    """``addresses`` if every one of them may be connected to under the current settings; else raise.

    Every address must pass, not only the one connected to first: a name that answers one public and
    one private address would otherwise reach the private one whenever the public one fails."""
    if host_is_blocked_name(host):
        raise OutboundRefused(refusal_message(host, None, NEVER), host=host)
    private_ok, networks = allow_private(), allowed_networks()
    checked = list(addresses)
    for address in checked:
        reason = address_refusal(address, allow_private=private_ok, allowed=networks)
        if reason is not None:
            raise OutboundRefused(refusal_message(host, address, reason), host=host, reason=reason)
    return checked


class SystemResolver:
    """The operating system's resolver (``getaddrinfo``), without blocking the event loop."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return _unique(info[4][0] for info in infos)

    def resolve_sync(self, host: str, port: int | None = None) -> list[IPAddress]:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return _unique(info[4][0] for info in infos)


def _unique(found: Iterable[str]) -> list[IPAddress]:
    addresses: list[IPAddress] = []
    for text in found:
        address = ipaddress.ip_address(text.split("%")[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


# Swapped by tests for a resolver they control; see the module docstring.
resolver: Any = SystemResolver()


def _connect_target(address: IPAddress) -> str:
    # An IPv4-mapped address is the IPv4 host it names; connecting to it as such needs no dual-stack socket.
    inner = address.ipv4_mapped if address.version == 6 else None
    return str(inner or address)


def _literal_or_blocked(host: str) -> list[IPAddress] | None:
    """The checked address of an IP-literal host; ``None`` for a name, after refusing a metadata name
    before it is even looked up."""
    literal = literal_address(host)
    if literal is not None:
        return check_addresses(host, [literal])
    check_addresses(host, [])
    return None


class _AsyncGuard:
    """An httpcore network backend that resolves and judges each host before any connection is opened,
    then connects to the very address it judged (no second lookup a rebinding name could answer
    differently). Written once for both cores: ``_core`` is ``httpcore2`` (httpx2: the openai, anthropic
    and google-genai SDKs) or ``httpcore`` (plain httpx: cohere)."""

    _core: Any

    def __init__(self) -> None:
        self._backend = self._core.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> Any:
        addresses = _literal_or_blocked(host)
        if addresses is None:
            try:
                with anyio.fail_after(timeout):
                    found = await resolver.resolve(host, port)
            except TimeoutError:
                raise self._core.ConnectTimeout(f"resolving {host} timed out") from None
            except OSError as exc:
                raise self._core.ConnectError(f"{host} could not be resolved ({exc})") from None
            addresses = check_addresses(host, found)
        last: Exception = self._core.ConnectError(f"{host} has no address")
        for address in addresses:
            try:
                return await self._backend.connect_tcp(
                    _connect_target(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except self._core.ConnectError as exc:
                last = exc
        raise last

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> Any:
        raise OutboundRefused("Outbound requests go over TCP only.")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class GuardedNetworkBackend(_AsyncGuard, httpcore2.AsyncNetworkBackend):
    """The guard for httpx2 clients."""

    _core = httpcore2


class PlainGuardedNetworkBackend(_AsyncGuard, httpcore.AsyncNetworkBackend):
    """The guard for SDKs built on plain ``httpx`` / ``httpcore`` (cohere)."""

    _core = httpcore


class _DeadlineStream(httpcore2.NetworkStream):
    """A connection whose every operation ends by ``deadline`` (``time.monotonic()``): httpx's timeouts bound each
    step (the connect, each write, each read), so a server sending a byte now and then holds a request as long
    as it likes; this bounds the whole exchange. Past the deadline an operation fails as its own timeout."""

    def __init__(self, stream: httpcore2.NetworkStream, deadline: float) -> None:
        self._stream = stream
        self._deadline = deadline

    def _left(self, timeout: float | None, expired: type[Exception]) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise expired("the request's deadline passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._left(timeout, httpcore2.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._left(timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore2.NetworkStream:
        left = self._left(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, left), self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _resolved_sync(host: str, port: int, wait: float | None) -> list[IPAddress]:
    """``resolver.resolve_sync(host, port)``, waited for at most ``wait`` seconds (``None``: as long as it takes).
    ``getaddrinfo`` cannot be interrupted: the lookup runs in a daemon thread of its own, left to end on its own
    (the resolver's timeouts) when it takes longer, so that the caller's bound holds, as the asynchronous guard's
    ``anyio.fail_after`` does. Past ``wait``, httpcore's ``ConnectTimeout``."""
    if wait is None:
        return resolver.resolve_sync(host, port)
    if wait <= 0:
        raise httpcore2.ConnectTimeout(f"the request's deadline passed before {host} was resolved")
    outcome: list[Any] = []

    def lookup() -> None:
        try:
            outcome.append(resolver.resolve_sync(host, port))
        except BaseException as exc:  # handed to the caller, who raises it
            outcome.append(exc)

    thread = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(wait)
    if not outcome:
        raise httpcore2.ConnectTimeout(f"resolving {host} timed out")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


class GuardedSyncNetworkBackend(httpcore2.NetworkBackend):
    """The same guard for synchronous clients (Celery tasks); with a ``deadline`` (``time.monotonic()``), every
    connection it opens ends by then (``_DeadlineStream``). The name's lookup is bounded by the connect timeout and
    the deadline alike (``_resolved_sync``): until 7 December it was bounded by neither, and a webhook host whose DNS
    did not answer held the worker past its deadline for as long as the resolver's own timeouts ran."""

    def __init__(self, *, deadline: float | None = None) -> None:
        self._backend = httpcore2.SyncBackend()
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.NetworkStream:
        addresses = _literal_or_blocked(host)
        if addresses is None:
            wait = timeout
            if self._deadline is not None:
                left = self._deadline - time.monotonic()
                wait = left if wait is None else min(wait, left)
            try:
                found = _resolved_sync(host, port, wait)
            except OSError as exc:
                raise httpcore2.ConnectError(f"{host} could not be resolved ({exc})") from None
            addresses = check_addresses(host, found)
        last: Exception = httpcore2.ConnectError(f"{host} has no address")
        for address in addresses:
            if self._deadline is not None:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise httpcore2.ConnectTimeout("the request's deadline passed")
                timeout = left if timeout is None else min(timeout, left)
            try:
                stream = self._backend.connect_tcp(
                    _connect_target(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore2.ConnectError as exc:
                last = exc
                continue
            return stream if self._deadline is None else _DeadlineStream(stream, self._deadline)
        raise last

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        raise OutboundRefused("Outbound requests go over TCP only.")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def origin_of(url: httpx2.URL | str) -> tuple[str, str, int | None]:
    url = httpx2.URL(url)
    return (url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme))


def _refuse_other_origin(origin: tuple[str, str, int | None], url: httpx2.URL) -> None:
    target = origin_of(url)
    if target != origin:
        scheme, host, port = target
        raise OutboundRefused(
            f"A redirect led to {scheme}://{host}:{port}, another origin than the one configured; "
            "the gateway does not follow it.",
            host=host,
        )


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One TLS context for every provider client: building one loads the CA bundle (tens of milliseconds on
    the event loop), and a client is built per user's own key (bring your own key), not only per provider."""
    return httpx2.create_ssl_context(trust_env=False)


def _pool_options(limits: httpx2.Limits) -> dict[str, Any]:
    return {
        "ssl_context": _ssl_context(),
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
    }


class OutboundTransport(httpx2.AsyncHTTPTransport):
    """httpx's transport for requests to one origin, over the guarded network backend.

    The environment's proxy settings are not used (a proxy would be the address judged, not the
    destination), and a request to another origin is refused before it is sent: the client follows
    redirects, so this is the check that keeps a redirect on the provider's origin."""

    def __init__(self, *, origin: str, limits: httpx2.Limits) -> None:
        super().__init__(verify=_ssl_context(), limits=limits, trust_env=False)
        self.origin = origin_of(origin)
        self._pool = httpcore2.AsyncConnectionPool(**_pool_options(limits), network_backend=GuardedNetworkBackend())

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        _refuse_other_origin(self.origin, request.url)
        return await super().handle_async_request(request)


class SyncOutboundTransport(httpx2.HTTPTransport):
    """``OutboundTransport`` for synchronous clients."""

    def __init__(self, *, origin: str, limits: httpx2.Limits, deadline: float | None = None) -> None:
        super().__init__(verify=_ssl_context(), limits=limits, trust_env=False)
        self.origin = origin_of(origin)
        backend = GuardedSyncNetworkBackend(deadline=deadline)
        self._pool = httpcore2.ConnectionPool(**_pool_options(limits), network_backend=backend)

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        _refuse_other_origin(self.origin, request.url)
        return super().handle_request(request)


def outbound_client(
    *,
    url: str,
    timeout: httpx2.Timeout | float,
    limits: httpx2.Limits | None = None,
    transport_class: Callable[..., httpx2.AsyncBaseTransport] = OutboundTransport,
    **kwargs: Any,
) -> httpx2.AsyncClient:
    """An ``httpx2.AsyncClient`` for requests to the origin of ``url`` only, under the outbound policy.
    ``transport_class`` is built with ``origin`` and ``limits``: ``OutboundTransport``, or one keeping the
    same guarantees over another connection pool (``adapters.aiohttp_client.GuardedAiohttpTransport``)."""
    return httpx2.AsyncClient(
        transport=transport_class(origin=url, limits=limits or httpx2.Limits()),
        timeout=timeout,
        follow_redirects=True,
        trust_env=False,
        **kwargs,
    )


def outbound_sync_client(
    *,
    url: str,
    timeout: httpx2.Timeout | float,
    follow_redirects: bool = True,
    deadline: float | None = None,
    **kwargs: Any,
) -> httpx2.Client:
    """``outbound_client`` for synchronous code. ``timeout`` bounds each step (connect, write, read);
    ``deadline`` (a ``time.monotonic()`` instant) all of them together: past it, whatever the client is doing
    fails as a timeout."""
    return httpx2.Client(
        transport=SyncOutboundTransport(origin=url, limits=httpx2.Limits(), deadline=deadline),
        timeout=timeout,
        follow_redirects=follow_redirects,
        trust_env=False,
        **kwargs,
    )


class PlainOutboundTransport(httpx.AsyncHTTPTransport):
    """``OutboundTransport`` for plain ``httpx``: one origin, the guarded backend, no environment proxies."""

    def __init__(self, *, origin: str, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        self.origin = origin_of(origin)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=PlainGuardedNetworkBackend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        _refuse_other_origin(self.origin, httpx2.URL(str(request.url)))
        return await super().handle_async_request(request)


def plain_outbound_client(
    *, url: str, timeout: httpx.Timeout | float, limits: httpx.Limits | None = None, **kwargs: Any
) -> httpx.AsyncClient:
    """``outbound_client`` for SDKs that take a plain ``httpx.AsyncClient``."""
    return httpx.AsyncClient(
        transport=PlainOutboundTransport(origin=url, limits=limits or httpx.Limits()),
        timeout=timeout,
        follow_redirects=True,
        trust_env=False,
        **kwargs,
    )
