"""The ``fake_upstreams`` fixture: several fake upstreams at once, each on its own port, which a test can
break and heal while traffic flows (registered in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llmhub.testing.fake_upstream import FakeUpstreams, UpstreamSpec


@pytest.fixture
def fake_upstreams() -> Iterator[Callable[..., FakeUpstreams]]:
    """A factory: ``fake_upstreams("east", "west", latency_ms=5)`` (names, ``UpstreamSpec``s, or a count,
    ``fake_upstreams(3)`` naming them ``u1``…``u3``; keyword arguments are every listener's defaults)
    starts them in one background thread and returns them, iterable and indexable by name or position.
    Each handle has ``.base_url``, ``.set_fault(...)``, ``.refuse()``, ``.accept()``, ``.set_timing(...)``
    and ``.requests_served()``; all may be called from sync or async tests, and a live server reaches them
    over loopback like any provider. Everything started is stopped after the test."""
    started: list[FakeUpstreams] = []

    def start(*upstreams: str | UpstreamSpec | int, **defaults: Any) -> FakeUpstreams:
        if len(upstreams) == 1 and isinstance(upstreams[0], int):
            upstreams = tuple(f"u{n}" for n in range(1, upstreams[0] + 1))
        specs = [
            upstream if isinstance(upstream, UpstreamSpec) else UpstreamSpec(name=str(upstream), **defaults)
            for upstream in upstreams or ("upstream",)
        ]
        group = FakeUpstreams(specs).start()
        started.append(group)
        return group

    yield start
    for group in reversed(started):
        group.stop()
