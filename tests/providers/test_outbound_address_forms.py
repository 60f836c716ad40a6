"""The spellings of a loopback or unspecified address that are not its usual one (a decimal, hex or octal IPv4, a
short one, ``0``, ``[::]``, ``localhost``, IPv4 inside IPv6) are refused under production's rules by both
provider clients (aiohttp, the default, and httpx2), with the system's own resolver, and nothing reaches the
listener behind them. ``test_outbound.py``'s matrix names each address in its usual spelling, through a resolver the
tests control; these spellings are what the operating system turns into an address (``getaddrinfo`` reads
``2130706433`` as 127.0.0.1), so they are asked of the real one."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx2
import pytest

from providers import outbound
from providers.adapters.aiohttp_client import GuardedAiohttpTransport

# Each reaches a listener on 127.0.0.1 (or on every address) if connected to.
SPELLINGS = [
    "2130706433",  # decimal
    "0x7f000001",  # hex
    "017700000001",  # octal
    "127.1",  # short
    "0",  # 0.0.0.0: the local host on Linux
    "[::]",
    "localhost",
    "[::ffff:7f00:1]",  # IPv4-mapped, in hex
    "[::127.0.0.1]",  # IPv4-compatible
]
CLIENTS = {"aiohttp": GuardedAiohttpTransport, "httpx": outbound.OutboundTransport}


class Listener:
    """A TCP listener on every address (IPv4 and IPv6) that counts the connections it accepts."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
        self.port = self.socket.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.socket.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.socket.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    served = Listener()
    yield served
    served.close()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("host", SPELLINGS)
async def test_another_spelling_of_a_local_address_is_refused(host, client, listener, settings):
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = False
    settings.LLMHUB_OUTBOUND_ALLOWED_NETWORKS = []
    accepted = listener.accepted
    url = f"http://{host}:{listener.port}/v1"
    async with outbound.outbound_client(url=url, timeout=3.0, transport_class=CLIENTS[client]) as http:
        # aiohttp refuses a legacy numeric IPv4 spelling itself ("is not a canonical IPv4 address", which its
        # transport maps to httpx2's UnsupportedProtocol) before the guard is asked; every other refusal is the
        # guard's.
        with pytest.raises((outbound.OutboundRefused, httpx2.UnsupportedProtocol)):
            await http.get(url + "/models")
    assert listener.accepted == accepted
