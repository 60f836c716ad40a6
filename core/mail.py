"""Email with one deadline for the whole SMTP session.

Django's SMTP backend has one timeout, ``EMAIL_TIMEOUT``, and it bounds each step: the connect, each write, each
read. A mail server that answers a byte now and then keeps every read within it and holds the sender as long as
it likes; for an alert, past its delivery's claim (``core.outbox``), the sweep then sends a second copy.
``mail_send_within`` bounds the whole session: when ``seconds`` have passed, its connection is shut down under
whatever the session is waiting for, and the send fails with ``MailDeadlineExceeded``.
"""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.mail import get_connection, send_mail
from django.core.mail.backends import smtp
from django.utils.module_loading import import_string


class MailDeadlineExceeded(smtplib.SMTPException):
    """The mail server did not finish the session in time. An ``SMTPException``, so a task that retries on SMTP
    failures retries this too."""


class DeadlineSmtpBackend(smtp.EmailBackend):
    """Django's SMTP backend whose sessions ``cut`` can end at once from another thread: it keeps each SMTP
    connection it opens (the connection is reachable before ``open`` returns, while the server's greeting is
    read)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sessions: list[tuple[smtplib.SMTP, socket.socket]] = []

    @property
    def connection_class(self) -> type[smtplib.SMTP]:
        sessions = self._sessions

        class Kept(super().connection_class):  # type: ignore[misc, valid-type]
            def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
                sock = super()._get_socket(host, port, timeout)
                sessions.append((self, sock))
                return sock

        return Kept

    def cut(self) -> None:
        """Shut down every connection this backend opened, so the read or write waiting on it fails now. The
        socket's own ``shutdown``: ``SSLSocket.shutdown`` would drop its TLS state under the reading thread."""
        for session, first in self._sessions:
            # After STARTTLS the session reads on a new socket; before, on the one it connected.
            for sock in (session.sock, first):
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except (OSError, TypeError):
                    pass  # closed already (or handed to TLS), or not set yet


def mail_send_within(
    *, seconds: float, setting: str, subject: str, body: str, recipients: Sequence[str], from_email: str | None = None
) -> None:
    """``send_mail`` with the whole SMTP session (connect, greeting, each command, the message, QUIT) bounded by
    ``seconds``; each step also keeps ``EMAIL_TIMEOUT``. Raises ``MailDeadlineExceeded`` (naming ``setting``) when
    the session was cut, or what the send raised. A backend other than Django's SMTP one (the tests' outbox, the
    console, a backend of the operator's own) sends as it would."""
    if import_string(settings.EMAIL_BACKEND) is not smtp.EmailBackend:
        send_mail(subject=subject, message=body, from_email=from_email, recipient_list=list(recipients))
        return
    step = min(settings.EMAIL_TIMEOUT or seconds, seconds)
    connection = get_connection(f"{DeadlineSmtpBackend.__module__}.DeadlineSmtpBackend", timeout=step)
    deadline = time.monotonic() + seconds
    cutter = threading.Timer(seconds, connection.cut)
    cutter.daemon = True
    cutter.start()
    try:
        send_mail(
            subject=subject, message=body, from_email=from_email, recipient_list=list(recipients), connection=connection
        )
    except (smtplib.SMTPException, OSError) as exc:
        if time.monotonic() < deadline:
            raise
        raise MailDeadlineExceeded(f"the mail server did not finish within {seconds:g} s ({setting})") from exc
    finally:
        cutter.cancel()
