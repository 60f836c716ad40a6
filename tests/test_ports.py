"""The ports the tests' servers take (llmhub.testing.ports): never where the kernel places a connection's
local port, never one another xdist worker is handed, never the same one twice in a row."""

from __future__ import annotations

import socket

import pytest

from llmhub.testing import ports


@pytest.fixture
def fresh_cursor(monkeypatch):
    monkeypatch.setattr(ports, "_cursor", None)
    return monkeypatch


def test_ports_lie_below_the_ephemeral_range_in_one_band_per_worker(fresh_cursor):
    bands = {}
    for worker in ("gw0", "gw1"):
        fresh_cursor.setenv("PYTEST_XDIST_WORKER", worker)
        bands[worker] = ports._band()
        fresh_cursor.setattr(ports, "_cursor", None)
        port = ports.free_port()
        assert port in bands[worker]
        assert port < ports._ephemeral_low()
    assert not set(bands["gw0"]) & set(bands["gw1"])
    fresh_cursor.delenv("PYTEST_XDIST_WORKER")
    assert not set(ports._band()) & (set(bands["gw0"]) | set(bands["gw1"]))


def test_ports_are_handed_out_in_turn_and_a_taken_one_is_skipped(fresh_cursor):
    first = ports.free_port()
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", first + 1))  # the next in turn is taken now
        except OSError:
            pass  # taken already (a server this worker started earlier): as good
        second = ports.free_port()
    assert second not in (first, first + 1)
    assert len({ports.free_port() for _ in range(50)}) == 50
