"""This process's established TCP connections, counted by asking each of its sockets (its ``TCP_INFO``
state, its peer), for tests that check a client closes what it opened.

Not read from ``/proc/net/tcp``: the kernel writes that table out a page at a time, and while other
connections open and close (a fake upstream's, the other tests' on the machine) one read lists some sockets
more than once, or leaves some out. A whole-suite run counted 56 connections where 9 were open, and a thread
opening and closing connections beside 9 open ones made a single read list 2,703 lines too many."""

from __future__ import annotations

import contextlib
import os
import socket

TCP_ESTABLISHED = 1  # include/net/tcp_states.h


def established_connections(*, peer_port: int | None = None, inodes: set[str] | None = None) -> int:
    """How many of this process's TCP sockets are ESTABLISHED: to ``peer_port`` if given (the client's end
    of a connection to a server on that port), among the sockets whose inodes ``inodes`` names if given."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # an fd closed meanwhile
            link = os.readlink(f"/proc/self/fd/{fd}")
            if not link.startswith("socket:["):
                continue
            inode = link[len("socket:[") : -1]
            if inodes is not None and inode not in inodes:
                continue
            if _established(int(fd), inode, peer_port):
                count += 1
    return count


def _established(fd: int, inode: str, peer_port: int | None) -> bool:
    """Whether the TCP socket at ``fd`` (still the one ``inode`` names) is ESTABLISHED, to ``peer_port`` if
    given. Asked of a duplicate of the fd, which is closed again whatever happens: the socket stays open."""
    duplicate = os.dup(fd)
    try:
        sock = socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        raise
    with sock:
        if str(os.fstat(sock.fileno()).st_ino) != inode:  # the fd was closed and reused meanwhile
            return False
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        if peer_port is not None and sock.getpeername()[1] != peer_port:
            return False
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_ESTABLISHED
