"""Mail servers that fail, for the tests of emails: backends that refuse (``mail_fails_once``), and an SMTP server
that trickles its answers (``TricklingMailServer``)."""

from __future__ import annotations

import smtplib
import socket
import threading
import time

from django.core.mail.backends import locmem


class MailFailingOnce(locmem.EmailBackend):
    """Django's test backend behind an SMTP server that refuses the first message sent to it."""

    failed = False

    def send_messages(self, messages):
        if not MailFailingOnce.failed:
            MailFailingOnce.failed = True
            raise smtplib.SMTPServerDisconnected("the mail server went away")
        return super().send_messages(messages)


class MailDown(locmem.EmailBackend):
    """Django's test backend behind an SMTP server that refuses every message; counts the attempts."""

    attempts = 0

    def send_messages(self, messages):
        MailDown.attempts += 1
        raise smtplib.SMTPServerDisconnected("the mail server went away")


class MailWhileSending(locmem.EmailBackend):
    """Django's test backend that, while it sends a message, first runs ``during`` once (another worker's task
    reaching the same notice at that moment), then sends."""

    during = None

    def send_messages(self, messages):
        during, MailWhileSending.during = MailWhileSending.during, None
        if during is not None:
            during()
        return super().send_messages(messages)


class TricklingMailServer:
    """An SMTP server (a socket server: the test needs no SMTP library) that takes every command and answers each
    one byte every ``pause`` seconds, so that every read of the client gets a byte well within any per-read timeout
    (Django's ``EMAIL_TIMEOUT``): only a bound on the whole session cuts it. Counts the sessions, and the messages
    it accepted (its answer to the end of DATA sent in full)."""

    def __init__(self, pause: float = 0.05) -> None:
        self.pause = pause
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sessions = 0
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.sessions += 1
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _answer(self, conn, line: bytes) -> None:
        for byte in line:
            time.sleep(self.pause)
            conn.sendall(bytes([byte]))

    def _session(self, conn) -> None:
        reader = conn.makefile("rb")
        try:
            with conn:
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
        except OSError:
            return  # the client hung up

    def close(self) -> None:
        self.listener.close()
