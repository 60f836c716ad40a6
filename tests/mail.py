"""Mail servers that fail, for the tests of emails: backends that refuse or interleave. The SMTP server that
trickles its answers is ``tests.trickling.TricklingMailServer``."""

from __future__ import annotations

import smtplib

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


class MailRefusingSome(locmem.EmailBackend):
    """Django's test backend behind an SMTP server that refuses every message to the addresses in ``refused``
    (the connection dropped while sending it) and takes the others; counts the refusals."""

    refused: frozenset[str] = frozenset()
    refusals = 0

    def send_messages(self, messages):
        if any(address in MailRefusingSome.refused for message in messages for address in message.recipients()):
            MailRefusingSome.refusals += 1
            raise smtplib.SMTPServerDisconnected("the mail server went away")
        return super().send_messages(messages)


class MailWhileSending(locmem.EmailBackend):
    """Django's test backend that, while it sends a message, first runs ``during`` once (another worker's task
    reaching the same notice at that moment), then sends."""

    during = None

    def send_messages(self, messages):
        during, MailWhileSending.during = MailWhileSending.during, None
        if during is not None:
            during()
        return super().send_messages(messages)
