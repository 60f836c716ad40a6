"""Loopback ports for the servers the tests, the benchmarks and the dev runner start in other processes.

Asking the kernel for port 0 and handing the number to a child races with every outgoing connection on
the machine: Linux takes a connection's local port from the same ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``, 32768-60999 by default), so between our ``close`` and the
child's ``bind`` a PostgreSQL, Redis or HTTP client connection can take the port, and the child dies on
"address already in use" (CI saw it as "nothing listens on 127.0.0.1:33487"). The ports handed out here
lie below that range, where the kernel never places a connection, in a band of their own for each
pytest-xdist worker so two workers never pick the same one; within a process they are handed out in turn,
so a port given to one server is not given to the next while the first is still starting.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from pathlib import Path

BAND = 1500
# The lowest port handed out: above the well-known and most registered services' ports.
LOWEST = 10000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _band() -> range:
    """This process's band: one per xdist worker (``gw0`` the first), the last ones shared by processes
    outside xdist, chosen by pid."""
    top = _ephemeral_low()
    slots = max(1, (top - LOWEST) // BAND)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit() and int(worker[2:]) < slots - 1:
        slot = int(worker[2:])
    else:
        slot = slots - 1 - (os.getpid() % 2 if slots > 2 else 0)
    low = LOWEST + slot * BAND
    return range(low, min(low + BAND, top))


_lock = threading.Lock()
_cursor: itertools.cycle | None = None
_cursor_pid = 0


def _candidates() -> itertools.cycle:
    global _cursor, _cursor_pid
    if _cursor is None or _cursor_pid != os.getpid():
        band = _band()
        start = os.getpid() % len(band)  # processes sharing the last band start apart
        _cursor = itertools.cycle([*band[start:], *band[:start]])
        _cursor_pid = os.getpid()
    return _cursor


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing listens on or is bound to now, outside the kernel's ephemeral range;
    falls back to one the kernel picks if the whole band is taken."""
    with _lock:
        cursor = _candidates()
        for _ in range(BAND):
            port = next(cursor)
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
