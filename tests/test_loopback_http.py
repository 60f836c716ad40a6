"""The aiohttp servers the tests run in threads of their own close their event loops when they stop: left open,
each loop (with its selector's descriptor) lived on until collected, then warned "unclosed event loop"
(ResourceWarning) in whatever test was running."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from aiohttp import web

from tests.gateway.test_stream_passthrough import ExactUpstream
from tests.loopback_http import AiohttpThreadServer
from tests.providers.test_outbound import Redirector


@contextmanager
def no_unclosed_resources() -> Iterator[None]:
    """Fails if anything made inside goes unclosed once collected (ResourceWarning made an error)."""
    gc.collect()  # an earlier test's leftovers are not this one's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    unclosed = [str(warning.message) for warning in caught if issubclass(warning.category, ResourceWarning)]
    assert not unclosed, unclosed


def exact_upstream() -> str:
    with ExactUpstream() as upstream:
        return httpx.post(upstream.base_url + "/chat/completions", json={}, timeout=10).text


def redirector() -> str:
    server = Redirector("http://127.0.0.1:9").start()
    try:
        return httpx.get(server.url + "/hook", timeout=10).text
    finally:
        server.stop()


def bare() -> str:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    with AiohttpThreadServer(app) as server:
        return httpx.get(server.origin, timeout=10).text


@pytest.mark.parametrize("serve", [bare, exact_upstream, redirector])
def test_a_thread_run_aiohttp_server_closes_its_loop_when_it_stops(serve: Callable[[], str]):
    with no_unclosed_resources():
        assert serve()
