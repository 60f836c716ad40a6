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
        with contextlib.suppress(OSError):  # an fd closed meanwhile, or not a TCP socket
            link = os.readlink(f"/proc/self/fd/{fd}")
            inode = link.removeprefix("socket:[").removesuffix("]")
            if inode == link or (inodes is not None and inode not in inodes):
                continue
            with socket.socket(fileno=os.dup(int(fd))) as sock:  # a duplicate: closing it leaves the socket open
                if str(os.fstat(sock.fileno()).st_ino) != inode:  # the fd was closed and reused meanwhile
                    continue
                if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                if peer_port is not None and sock.getpeername()[1] != peer_port:
                    continue
                count += sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_ESTABLISHED
    return count
