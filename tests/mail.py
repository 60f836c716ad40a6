"""A mail server that fails, for the tests of emails to users (``mail_fails_once``)."""

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
