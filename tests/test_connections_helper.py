"""``tests/connections.py``, the tests' count of established connections: exact, and leaving no descriptor
behind (it once kept a duplicate of every pipe it looked at, and the adapter tests ran out of descriptors)."""

from __future__ import annotations

import os
import socket

from tests.connections import established_connections


def test_one_connection_is_counted_once_and_no_descriptor_is_left_behind():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    read_end, write_end = os.pipe()  # not a socket: passed over
    try:
        before = len(os.listdir("/proc/self/fd"))
        assert established_connections(peer_port=port) == 1  # the client's end, not the server's
        assert established_connections(peer_port=port) == 1
        assert established_connections(inodes={str(os.fstat(client.fileno()).st_ino)}) == 1
        assert len(os.listdir("/proc/self/fd")) == before

        client.close()
        assert established_connections(peer_port=port) == 0
    finally:
        for end in (read_end, write_end):
            os.close(end)
        for sock in (client, accepted, server):
            sock.close()
