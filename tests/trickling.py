"""Servers that answer a byte at a time, for the tests of the deadlines on a whole delivery: every read of the
client gets a byte well within any per-read timeout, so only a bound on the whole exchange cuts it.
``TricklingServer`` is the socket server they share (accept, count, trickle an answer); ``TricklingMailServer``
speaks SMTP, ``TricklingHttp`` answers an HTTP request (``TricklingWebhook``: one POST)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from abc import ABC, abstractmethod


class TricklingServer(ABC):
    """A socket server on 127.0.0.1 (the tests need no protocol library) that runs ``_session`` for each
    connection in a thread of its own and sends its answers one byte every ``pause`` seconds (``_answer``).
    Counts the connections (``sessions``); a subclass counts what it managed to answer in full (``accepted``)."""

    def __init__(self, pause: float = 0.05) -> None:
        self.pause = pause
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sessions = 0
        self.accepted = 0
        self._accepting = threading.Thread(target=self._serve, daemon=True)
        self._accepting.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.sessions += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._session(conn)
        except OSError:
            return  # the client hung up

    @abstractmethod
    def _session(self, conn: socket.socket) -> None:
        """Speak the protocol on ``conn`` (each subclass its own), answering through ``_answer``."""

    def _answer(self, conn: socket.socket, data: bytes) -> None:
        for byte in data:
            time.sleep(self.pause)
            conn.sendall(bytes([byte]))

    def close(self) -> None:
        # Closing alone does not wake the thread blocked in ``accept`` (Linux), which keeps the socket open and
        # answering for the rest of the run; shutting it down does.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accepting.join(timeout=10)


class TricklingMailServer(TricklingServer):
    """An SMTP server that takes every command and trickles each answer, so that only a bound on the whole session
    (not Django's per-read ``EMAIL_TIMEOUT``) cuts it. ``accepted``: the messages whose answer to the end of DATA
    it sent in full."""

    def _session(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        self._answer(conn, b"220 trickle.example ESMTP\r\n")
        in_data = False
        while line := reader.readline():
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    self._answer(conn, b"250 queued\r\n")
                    self.accepted += 1
                continue
            verb = line[:4].upper()
            if verb == b"DATA":
                in_data = True
                self._answer(conn, b"354 go on\r\n")
            elif verb == b"QUIT":
                self._answer(conn, b"221 bye\r\n")
                return
            else:
                self._answer(conn, b"250 ok\r\n")


class TricklingHttp(TricklingServer):
    """An HTTP server that reads a request's head and trickles ``answer`` (a whole response) back. ``accepted``: the
    answers it sent in full."""

    answer: bytes

    def _session(self, conn: socket.socket) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = conn.recv(65536)
            if not chunk:
                return
            received += chunk
        self._answer(conn, self.answer)
        self.accepted += 1


class TricklingWebhook(TricklingHttp):
    """A webhook receiver that reads the POST's head and trickles ``200 ok`` (about 3 s at the default pause)."""

    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/T000/B000/trickle"
