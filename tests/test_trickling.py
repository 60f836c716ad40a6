"""``tests/trickling.py``, the servers that answer a byte at a time: closed, one takes no more connections and
leaves no thread behind (a thread blocked in ``accept`` kept its listening socket open, and answering, for the
rest of the run)."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.trickling import TricklingMailServer, TricklingWebhook


@pytest.mark.parametrize("kind", [TricklingMailServer, TricklingWebhook])
def test_a_closed_trickling_server_refuses_connections_and_its_thread_ends(kind):
    before = set(threading.enumerate())
    server = kind()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass  # it listens while open

    server.close()

    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0  # nothing listens there any more
    assert not [thread for thread in set(threading.enumerate()) - before if thread.name.endswith("(_serve)")]
