"""Email with one deadline for the whole SMTP session.

Django's SMTP backend has one timeout, ``EMAIL_TIMEOUT``, and it bounds each step: the connect, each write, each
read. A mail server that answers a byte now and then keeps every read within it and holds the sender as long as
it likes: a worker sending a user's notice, a request sending a password reset; for an alert, past its delivery's
claim (``core.outbox``), the sweep then sends a second copy. ``DeadlineSmtpBackend``, the backend every email goes
through when Django's SMTP backend is configured (the settings put it in its place), bounds each send: when its
deadline (``LLMHUB_EMAIL_DEADLINE_SECONDS``; alerts' own, ``mail_send_within``) has passed, its connection is shut
down under whatever the session is waiting for, and the send fails with ``MailDeadlineExceeded``."""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.mail import EmailMessage, get_connection, send_mail
from django.core.mail.backends import smtp
from django.utils.module_loading import import_string


class MailDeadlineExceeded(smtplib.SMTPException):
    """The mail server did not finish the session in time. An ``SMTPException``, so a task that retries on SMTP
    failures retries this too."""


class DeadlineSmtpBackend(smtp.EmailBackend):
    """Django's SMTP backend with each ``send_messages`` (opening the session when it is not open, each message,
    closing it) bounded by ``deadline`` seconds (``LLMHUB_EMAIL_DEADLINE_SECONDS`` unless given; ``setting`` is
    the name a ``MailDeadlineExceeded`` gives for it). Each step keeps ``EMAIL_TIMEOUT``, or the deadline when
    shorter."""

    def __init__(
        self,
        *args: Any,
        deadline: float | None = None,
        setting: str = "LLMHUB_EMAIL_DEADLINE_SECONDS",
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.deadline = settings.LLMHUB_EMAIL_DEADLINE_SECONDS if deadline is None else deadline
        self.setting = setting
        if timeout is None:
            timeout = min(settings.EMAIL_TIMEOUT or self.deadline, self.deadline)
        super().__init__(*args, timeout=timeout, **kwargs)
        self._sessions: list[tuple[smtplib.SMTP, socket.socket]] = []

    @property
    def connection_class(self) -> type[smtplib.SMTP]:
        # Each SMTP connection is kept as it opens (before ``open`` returns, while the server's greeting is read),
        # so that ``cut`` reaches it from the timer's thread.
        sessions = self._sessions

        class Kept(super().connection_class):  # type: ignore[misc, valid-type]
            def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
                sock = super()._get_socket(host, port, timeout)
                sessions.append((self, sock))
                return sock

        return Kept

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        if not email_messages:
            return 0
        deadline = time.monotonic() + self.deadline
        cutter = threading.Timer(self.deadline, self.cut)
        cutter.daemon = True
        cutter.start()
        try:
            return super().send_messages(email_messages)
        except (smtplib.SMTPException, OSError) as exc:
            if time.monotonic() < deadline:
                raise
            raise MailDeadlineExceeded(
                f"the mail server did not finish within {self.deadline:g} s ({self.setting})"
            ) from exc
        finally:
            cutter.cancel()

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
    """``send_mail`` with the whole SMTP session bounded by ``seconds`` rather than ``LLMHUB_EMAIL_DEADLINE_SECONDS``
    (``DeadlineSmtpBackend``). Raises ``MailDeadlineExceeded`` (naming ``setting``) when the session was cut, or what
    the send raised. A backend other than the SMTP one (the tests' outbox, the console, a backend of the operator's
    own) sends as it would."""
    backend = import_string(settings.EMAIL_BACKEND)
    if backend is not smtp.EmailBackend and not issubclass(backend, DeadlineSmtpBackend):
        send_mail(subject=subject, message=body, from_email=from_email, recipient_list=list(recipients))
        return
    connection = get_connection(
        f"{DeadlineSmtpBackend.__module__}.{DeadlineSmtpBackend.__qualname__}", deadline=seconds, setting=setting
    )
    send_mail(
        subject=subject, message=body, from_email=from_email, recipient_list=list(recipients), connection=connection
    )
